"""Data: batch types (the one contract between data and model), readers, collate, the DataModule."""
