"""How the code is built, measured from its syntax tree: the figures issue 19 asks before and after the redesign.

    python bench/code_metrics.py [--ref a01abc8] [--name code_metrics_after]

`--ref` measures a git commit (its files read with `git show`, nothing checked out); without it, the working tree.
What is counted (code only: docstrings and comments are not code):

- lines per top-level area of the package (a module or a sub-package; all lines, as `wc -l`);
- the 10 longest functions (methods included; a nested function counts inside its parent and on its own);
- strategy names: modules whose identifiers or non-docstring strings name a distribution strategy (DDP,
  DistributedDataParallel, FSDP, DeepSpeed, ZeRO, zero_stage); reported for the whole package and outside the
  packages whose job it is (`strategy/`, and `config/` whose vocabulary lists the choices);
- clipping: reads of `gradient_clip_val` outside `config/`; calls of a clipping primitive (`clip_grad_norm_`,
  `clip_gradients`, `clip_grad_norm_sharded_`, `configure_gradient_clipping`) or a `gradient_clipping` key, and
  whether they are inside `strategy/`; and the call sites of a step driver's `clip` (the one decision);
- GradCache setting reads: reads of a name, attribute or keyword `gradcache`, `chunk_size`, `token_budget` or
  `sort_by_length` (the setting's keys) outside `config/`, with the modules reading them;
- config field docstrings: fields of the config dataclasses followed by a string (the field's docstring);
- job list definitions: outermost literals (dict, tuple, list, set) whose strings name at least 4 of the jobs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STRATEGY = re.compile(r"(?i)\b(ddp\w*|distributeddataparallel|fsdp\w*|deepspeed\w*|zero[_-]?stage|zero[-_]?[123])\b")
GRADCACHE_KEYS = {"gradcache", "chunk_size", "token_budget", "sort_by_length"}
JOBS = {"train", "evaluate", "shard", "reranker", "mine", "pipeline", "sweep", "plan", "report", "doctor", "generate"}


def package_files(ref: str | None) -> dict[str, str]:
    """{path relative to the repo: source} of every .py file under embedscale/."""
    if ref is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "embedscale").rglob("*.py"))}
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref, "embedscale"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    files = {}
    for name in names:
        if name.endswith(".py"):
            files[name] = subprocess.run(
                ["git", "show", f"{ref}:{name}"], capture_output=True, text=True, check=True, cwd=ROOT
            ).stdout
    return files


def docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function, and field docstrings)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if (
                    isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    out.add(id(stmt.value))
    return out


def code_words(tree: ast.AST) -> list[str]:
    """Identifiers and non-docstring strings of a module (f-string parts included)."""
    docs = docstring_nodes(tree)
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            words.append(node.name)
        elif isinstance(node, ast.alias):
            words.append(node.name)
        elif isinstance(node, ast.arg):
            words.append(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            words.append(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words.append(node.value)
    return words


CLIP_PRIMITIVES = {"clip_grad_norm_", "clip_gradients", "clip_grad_norm_sharded_", "configure_gradient_clipping"}


def job_literals(tree: ast.AST) -> list[ast.AST]:
    """Outermost container literals whose string constants (at any depth) name at least 4 jobs."""
    found: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Dict | ast.Tuple | ast.List | ast.Set):
            names = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if len(names & JOBS) >= 4:
                found.append(node)
                return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def area(path: str) -> str:
    parts = Path(path).parts  # embedscale/<area>...
    return parts[1] + ("/" if len(parts) > 2 else "")


def measure(files: dict[str, str]) -> dict:
    lines_by_area: Counter = Counter()
    functions, strategy_modules, gradcache, gc_modules, job_lists = [], [], [], set(), []
    clip_reads, clip_primitives, driver_clips = [], [], []
    fields = documented = 0
    undocumented: list[str] = []
    for path, source in files.items():
        lines_by_area[area(path)] += source.count("\n")
        tree = ast.parse(source)
        in_config = area(path).startswith("config")
        if any(STRATEGY.search(w) for w in code_words(tree)):
            strategy_modules.append(path)
        job_lists += [f"{path}:{n.lineno}" for n in job_literals(tree)]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
            if not in_config:
                if isinstance(node, ast.Attribute) and node.attr == "gradient_clip_val":
                    clip_reads.append(f"{path}:{node.lineno}")
                if isinstance(node, ast.Call):
                    callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if callee in CLIP_PRIMITIVES:
                        clip_primitives.append(f"{path}:{node.lineno} {callee}")
                    elif callee == "clip":
                        driver_clips.append(f"{path}:{node.lineno}")
                if isinstance(node, ast.Constant) and node.value == "gradient_clipping":
                    clip_primitives.append(f"{path}:{node.lineno} gradient_clipping key")
                name = None
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    name = node.attr
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    name = node.id
                elif isinstance(node, ast.keyword):
                    name = node.arg
                if name in GRADCACHE_KEYS:
                    gradcache.append(f"{path}:{node.lineno} {name}")
                    gc_modules.add(path)
            if (
                in_config
                and isinstance(node, ast.ClassDef)
                and any(
                    (isinstance(d, ast.Name) and d.id == "dataclass")
                    or (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "dataclass")
                    for d in node.decorator_list
                )
            ):
                body = node.body
                for i, stmt in enumerate(body):
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        if stmt.target.id.startswith("_"):
                            continue
                        fields += 1
                        nxt = body[i + 1] if i + 1 < len(body) else None
                        if (
                            isinstance(nxt, ast.Expr)
                            and isinstance(nxt.value, ast.Constant)
                            and isinstance(nxt.value.value, str)
                        ):
                            documented += 1
                        else:
                            undocumented.append(f"{node.name}.{stmt.target.id}")
    total = sum(lines_by_area.values())
    top = sorted(functions, reverse=True)[:10]
    strategy_outside = [
        p for p in strategy_modules if not area(p).startswith("strategy") and not area(p).startswith("config")
    ]
    return {
        "modules": len(files),
        "lines_total": total,
        "lines_by_area": dict(sorted(lines_by_area.items(), key=lambda kv: -kv[1])),
        "largest_functions": [{"lines": n, "where": w} for n, w in top],
        "median_function_lines": sorted(n for n, _ in functions)[len(functions) // 2] if functions else 0,
        "modules_naming_a_strategy": len(strategy_modules),
        "modules_naming_a_strategy_outside_strategy_and_config": strategy_outside,
        "clip_value_reads": clip_reads,
        "clip_primitive_calls": clip_primitives,
        "clip_primitive_calls_outside_strategy": [c for c in clip_primitives if "/strategy" not in c],
        "driver_clip_call_sites": driver_clips,
        "gradcache_setting_reads": gradcache,
        "gradcache_setting_modules": sorted(gc_modules),
        "config_fields": fields,
        "config_fields_documented": documented,
        "config_fields_undocumented": undocumented,
        "job_list_definitions": job_lists,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default=None, help="a git commit to measure instead of the working tree")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    result = measure(package_files(args.ref))
    command = "python bench/code_metrics.py " + " ".join(sys.argv[1:])
    print(command)
    print(f"tree: {args.ref or 'working tree'}; {result['modules']} modules, {result['lines_total']} lines")
    print("\n| area | lines | share |\n|---|---|---|")
    for name, n in result["lines_by_area"].items():
        print(f"| {name} | {n} | {100 * n / result['lines_total']:.1f}% |")
    print("\n| lines | largest functions |\n|---|---|")
    for f in result["largest_functions"]:
        print(f"| {f['lines']} | {f['where']} |")
    cov = result["config_fields_documented"] / max(result["config_fields"], 1)
    rows = [
        ("modules naming a strategy (all)", result["modules_naming_a_strategy"]),
        (
            "... outside strategy/ and config/",
            len(result["modules_naming_a_strategy_outside_strategy_and_config"]),
        ),
        ("reads of gradient_clip_val (outside config/)", len(result["clip_value_reads"])),
        (
            "clipping primitive calls / of them outside strategy/",
            f"{len(result['clip_primitive_calls'])} / {len(result['clip_primitive_calls_outside_strategy'])}",
        ),
        ("call sites of a step driver's clip", len(result["driver_clip_call_sites"])),
        (
            "GradCache setting reads / modules",
            f"{len(result['gradcache_setting_reads'])} / {len(result['gradcache_setting_modules'])}",
        ),
        ("config field docstrings", f"{result['config_fields_documented']}/{result['config_fields']} ({cov:.0%})"),
        ("job list definitions", len(result["job_list_definitions"])),
        ("median function lines", result["median_function_lines"]),
    ]
    print("\n| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.name:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{args.name}.json"
        out.write_text(
            json.dumps({"command": command, "machine": machine(), "ref": args.ref, **result}, indent=2) + "\n"
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
