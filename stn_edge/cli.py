"""The ``stn-edge`` command line: bake | inspect | plan | run | verify | export | profile | demo.

Exit codes: 0 success, 1 verification failed, 2 usage error, and per error family: 3 artifact,
4 budget, 5 backend, 6 input, 7 capture. Typed errors print one ``error:`` line, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stn_edge import __version__
from stn_edge.errors import InputError, STNError
from stn_edge.plan import format_bytes, format_table


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=_json_default) if args.json else text)


def _json_default(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


# --------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from stn_edge.format import ArtifactReader

    with ArtifactReader(args.artifact) as r:
        h = r.header
        model = h["model"]
        rows = [("layer", "family", "dense shape", "max rank", "ladder", "bytes at levels")]
        for l in h["layers"]:
            lad = l["ladder"]
            rows.append((l["name"], l["family"], "x".join(map(str, l["dense"]["shape"])), str(l.get("max_rank", "")),
                         f"{len(lad['ranks'])} levels, rank {lad['ranks'][0]}..{lad['ranks'][-1]}",
                         f"{format_bytes(lad['bytes'][0])}..{format_bytes(lad['bytes'][-1])}"))
        for s in h.get("skipped", []):
            rows.append((s["weight"], "dense", "", "", s["reason"], ""))
        searched = [l for l in h["layers"] if l.get("search")]
        search_text = ""
        if searched:
            srows = [("layer", "candidate", "score", "err@10%", "err@25%", "err@50%", "MACs/dense", "seconds")]
            why = []
            for l in searched:
                for c in l["search"][:4]:
                    if "skipped" in c or "fallback" in c:
                        continue
                    ratio = c.get("macs_ratio")
                    srows.append((l["name"] if c.get("chosen") else "", ("* " if c.get("chosen") else "  ") + c["name"],
                                  f"{c['score']:.4f}", f"{c['err@10%']:.3f}", f"{c['err@25%']:.3f}", f"{c['err@50%']:.3f}",
                                  "" if ratio is None else f"{ratio:.2f}", f"{c['seconds']:.2f}"))
                why += [f"  {l['name']}: {c['name']}: {c['skipped']}" for c in l["search"] if "skipped" in c]
                why += [f"  {l['name']}: {c['name']}: {c['notes']}" for c in l["search"][:4] if c.get("notes")]
            search_text = "\n\nstructure search (chosen *, runners-up; relative weight error at % of dense bytes)\n" + format_table(srows)
            if why:
                search_text += "\n\nskipped or cut:\n" + "\n".join(why)
        acts = _activation_summary(r)
        ios = "; ".join(f"{v['name']} {v['shape']} {v['dtype']}" for v in model["inputs"])
        outs = "; ".join(f"{v['name']} {v['shape']} {v['dtype']}" for v in model["outputs"])
        text = (f"{args.artifact}: stn format {r.version[0]}.{r.version[1]}, {h.get('producer', '?')}\n"
                f"inputs: {ios}\noutputs: {outs}\n{len(model['nodes'])} nodes, {len(h['layers'])} factorized layers, "
                f"{len(h['tensors'])} dense tensors; full model {format_bytes(h['full_bytes'])}, "
                f"file {format_bytes(r.data_start + r.data_size)}\n{acts['text']}\n\n" + format_table(rows) + search_text)
        data = {
            "version": list(r.version), "producer": h.get("producer"), "inputs": model["inputs"], "outputs": model["outputs"],
            "nodes": len(model["nodes"]), "full_bytes": h["full_bytes"],
            "layers": [{k: l[k] for k in ("name", "family", "kind", "node", "max_rank", "ladder", "structure", "search", "tied") if k in l}
                       | {"dense_shape": l["dense"]["shape"]} for l in h["layers"]],
            "skipped": h.get("skipped", []),
            "activations": {k: v for k, v in acts.items() if k != "text"},
        }
    _emit(args, data, text)
    return 0


def _activation_summary(reader) -> dict:
    """Whether the artifact records value shapes, and the full model's activation peak on numpy at
    batch 1 and 32 (what ``mem_limit`` adds for them; other engines count their own)."""
    if not reader.header.get("value_shapes"):
        return {"recorded": False, "text": "activations: not recorded (format 1.0 or a graph numpy cannot run): "
                                           "mem_limit counts weights only"}
    from stn_edge.device.backends import get_backend
    from stn_edge.device.runtime import Runtime

    rt = Runtime(reader, get_backend("numpy"), "cpu", "inspect")
    peaks = {}
    for batch in (1, 32):
        peaks[batch] = rt.plan_for(None, batch).activation_bytes
    return {"recorded": True, "numpy_peak": peaks,
            "text": f"activations (full model, numpy): {format_bytes(peaks[1])} at batch 1, "
                    f"{format_bytes(peaks[32])} at batch 32"}


def _runtime(args: argparse.Namespace):
    from stn_edge.device import Runtime

    return Runtime.load(args.artifact, mem_limit=args.mem_limit, backend=args.backend, device=args.device,
                        batch_size=getattr(args, "batch_size", 1), latency_limit_ms=args.latency_limit_ms,
                        profile=args.profile)


def cmd_plan(args: argparse.Namespace) -> int:
    from stn_edge.format import ArtifactReader
    from stn_edge.plan import plan_artifact

    with ArtifactReader(args.artifact) as reader:
        if args.backend is None:
            if args.latency_limit_ms is not None:
                raise InputError("plan --latency-limit-ms needs --backend: latency is predicted per engine")
            plan = plan_artifact(reader, args.mem_limit)
        else:  # count the engine's copies and the activations, as Runtime.load on that backend does
            from stn_edge.device.backends import get_backend
            from stn_edge.device.runtime import Runtime

            rt = Runtime(reader, get_backend(args.backend), "cpu", f"requested {args.backend!r}")
            rt.limit_latency(args.latency_limit_ms, args.profile)
            plan = rt.plan_for(args.mem_limit, args.batch_size)  # reads the header only; checks the batch size
    _emit(args, plan.to_dict(), plan.table())
    return 0


def _load_inputs(specs: Sequence[str], names: list[str]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        name, _, path = spec.rpartition("=")
        if not name:
            if i >= len(names):
                raise InputError(f"more --input files than model inputs {names}")
            name = names[i]
        p = Path(path)
        if not p.is_file():
            raise InputError(f"input file {path} does not exist")
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{path} is not a readable .npy file ({exc})") from None
        feeds[name] = arr
    return feeds


def cmd_run(args: argparse.Namespace) -> int:
    with _runtime(args) as rt:
        if args.input:
            feeds = _load_inputs(args.input, rt.input_names)
        else:
            feeds = rt.calibration("inputs")
            if not feeds:
                raise InputError("no --input given and the artifact has no calibration inputs to run")
        out = rt.run(feeds)
        if args.output:
            np.savez(args.output, **out)
        data = {"backend": rt.backend, "backend_reason": rt.backend_reason, "plan": rt.plan.to_dict(),
                "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "mean": float(v.mean()), "std": float(v.std())}
                            for k, v in out.items()}}
        text = "\n".join(f"{k}: shape {list(v.shape)} {v.dtype}, mean {v.mean():.4g}, std {v.std():.4g}" for k, v in out.items())
        text += f"\n({rt.backend_reason}; {rt.plan.summary()})" + (f"\nwrote {args.output}" if args.output else "")
    _emit(args, data, text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _runtime(args) as rt:
        errors = rt.verify()
        worst = max(errors.values(), default=0.0)
        ok = worst <= args.tolerance
        data = {"backend": rt.backend, "budget": rt.plan.budget, "bytes": rt.plan.total_bytes, "relative_error": errors,
                "tolerance": args.tolerance, "ok": ok}
        text = format_table([("output", "max relative error")] + [(k, f"{v:.3g}") for k, v in errors.items()])
        text += f"\n{'OK' if ok else 'FAILED'}: worst {worst:.3g} vs tolerance {args.tolerance:g} ({rt.backend}, {rt.plan.summary()})"
    _emit(args, data, text)
    return 0 if ok else 1


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--input-shape {text!r} must be integers like 1,3,32,32") from None
    if not shape or min(shape) < 1:
        raise InputError(f"--input-shape {text!r} must be positive integers like 1,3,32,32")
    return shape


def _structure(text: str) -> str | list[str]:
    """``--structure``: ``auto``, one family, or a comma-separated list of families."""
    from stn_edge.host.decompositions import names as known

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["auto"]:
        return "auto"
    unknown = [n for n in names if n not in known()]
    if not names or unknown:
        raise InputError(f"--structure {text!r}: unknown families {unknown}; use auto, or some of {', '.join(known())}")
    return names[0] if len(names) == 1 else names


def cmd_bake(args: argparse.Namespace) -> int:
    import torch

    from stn_edge.errors import CaptureError
    from stn_edge.host import bake

    structure = _structure(args.structure)
    if args.model.endswith(".onnx"):
        model: Any = args.model
        example = None
    else:
        mod_name, _, attr = args.model.partition(":")
        if not attr:
            raise CaptureError(f"model {args.model!r} must be 'package.module:factory' or a path to an .onnx file")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # `stn-edge bake mymodels:Net` run where mymodels.py is, as `python -m` does
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CaptureError(f"cannot import {args.model!r}: {exc}") from None
        model = factory()
        if args.weights:
            try:
                state = torch.load(args.weights, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CaptureError(f"cannot read weights {args.weights}: {exc}") from None
            model.load_state_dict(state)
        model.eval()
        if not args.input_shape:
            raise InputError("--input-shape is required for a torch model (e.g. 1,3,32,32)")
    shapes = [_parse_shape(s) for s in (args.input_shape or [])]
    calibration = None
    if not args.calibration:
        print("note: no --calibration given: importance is scored on random calibration inputs; pass real "
              "inputs (.npy) for budgets that follow accuracy", file=sys.stderr)
    if args.calibration:
        calibration = tuple(torch.from_numpy(np.load(p, allow_pickle=False)) for p in args.calibration)
    if isinstance(model, str):
        report = bake(model, None, args.output, calibration=calibration or tuple(torch.randn(*s) for s in shapes) or None,
                      levels=args.levels, structure=structure, importance=args.importance,
                      progress=not args.json)
    else:
        example = tuple(torch.randn(*s) for s in shapes)
        report = bake(model, example if len(example) > 1 else example[0], args.output, calibration=calibration,
                      levels=args.levels, structure=structure, importance=args.importance,
                      progress=not args.json)
    data = {"path": report.path, "artifact_bytes": report.artifact_bytes, "full_bytes": report.full_bytes,
            "seconds": report.seconds, "layers": [vars(l) for l in report.layers], "skipped": [vars(s) for s in report.skipped]}
    _emit(args, data, report.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stn_edge.host.demo import run_demo

    out = str(Path(args.keep) / "digits.stn") if args.keep else args.output
    rows = run_demo(backend=args.backend, out=out, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                    quiet=args.json)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stn_edge.device.export import export_model

    report = export_model(args.artifact, args.output, format=args.format, mem_limit=args.mem_limit, batch=args.batch,
                          check=not args.no_check, tolerance=args.tolerance)
    _emit(args, report.to_dict(), report.summary())
    return 0 if report.ok else 1


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r} must be positive integers like 1,8") from None
    if not values or min(values) < 1:
        raise InputError(f"{what} {text!r} must be positive integers like 1,8")
    return values


def cmd_profile(args: argparse.Namespace) -> int:
    from stn_edge.device.profile import profile_artifact

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    batches = _int_list(args.batch, "--batch")
    say = (lambda msg: None) if args.json else (lambda msg: print(f"[profile] {msg}", file=sys.stderr, flush=True))
    report = profile_artifact(args.artifact, budgets=budgets, backend=args.backend, device=args.device, batches=batches,
                              warmup=args.warmup, seconds=args.seconds, per_layer=args.per_layer, progress=say)
    text = report.table()
    if args.per_layer:
        text += "\n\n" + "\n\n".join(t.table() for t in report.layers)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "profile.json"]
        written[0].write_text(json.dumps(report.to_dict(), indent=1, default=_json_default))
        for table in report.layers:
            written.append(out / f"layer_latency-{table.backend}-{table.device}-b{table.batch}.json")
            table.save(written[-1])
        try:
            report.plot(out / "profile.png")
            written.append(out / "profile.png")
        except ImportError as exc:
            print(f"note: no plot ({exc}); pip install matplotlib", file=sys.stderr)
        text += "\nwrote " + ", ".join(str(p) for p in written)
    _emit(args, report.to_dict(), text)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stn-edge", description="Bake a compressed network once; fit it to any device at load time.")
    p.add_argument("--version", action="version", version=f"stn-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, runtime: bool = False) -> None:
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if runtime:
            sp.add_argument("artifact", help="path to a .stn artifact")
            sp.add_argument("--mem-limit", default=None, help="budget: bytes, 12MB, 3MiB or 35%% (default: full model)")
            sp.add_argument("--backend", default="auto", help="numpy, onnxruntime, ... or auto (default)")
            sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
            latency(sp)

    def latency(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--latency-limit-ms", type=float, default=None,
                        help="also keep the predicted latency at batch 1 within this (default: the most accurate "
                             "plan within --mem-limit)")
        sp.add_argument("--profile", default=None,
                        help="with --latency-limit-ms: a per-layer table from 'stn-edge profile --per-layer' "
                             "(default: the engine's cost model)")

    def batch_size(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--batch-size", type=int, default=1,
                        help="largest batch one engine call runs (larger ones run in chunks); its activations "
                             "count in --mem-limit (default 1)")

    sp = sub.add_parser("bake", help="capture, decompose and write a .stn artifact")
    sp.add_argument("model", help="package.module:factory (a callable returning a torch module) or model.onnx")
    sp.add_argument("--weights", help="state-dict file for the torch model")
    sp.add_argument("--input-shape", action="append", help="example input shape, e.g. 1,3,32,32 (repeat per input)")
    sp.add_argument("--calibration", action="append", help=".npy file of calibration inputs (repeat per input)")
    sp.add_argument("-o", "--output", required=True, help="artifact path to write")
    sp.add_argument("--levels", type=int, default=32, help="truncation levels per layer (default 32)")
    sp.add_argument("--structure", default="auto",
                    help="auto (default: search the decomposition per layer), svd (fastest bake), or a "
                         "comma-separated list of families to search among, e.g. svd,tucker2")
    sp.add_argument("--importance", choices=("data", "spectral"), default="data")
    common(sp)
    sp.set_defaults(func=cmd_bake)

    sp = sub.add_parser("inspect", help="show an artifact's inputs, layers and ladders")
    sp.add_argument("artifact")
    common(sp)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("plan", help="show the ranks a budget gets, without loading weights")
    sp.add_argument("artifact")
    sp.add_argument("--backend", default=None,
                    help="count this engine's copies of the weights and its activations, as loading on it would "
                         "(default: weights only)")
    sp.add_argument("--mem-limit", default=None, help="budget: bytes, 12MB, 3MiB or 35%% (default: full model)")
    sp.add_argument("--batch-size", type=int, default=1, help="with --backend: the batch whose activations count (default 1)")
    latency(sp)
    common(sp)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("run", help="run the model on .npy inputs (or its calibration inputs)")
    common(sp, runtime=True)
    batch_size(sp)
    sp.add_argument("--input", action="append", help="name=file.npy or file.npy (in input order)")
    sp.add_argument("--output", help="write the outputs to this .npz")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("verify", help="run the calibration set and report the error against the reference")
    common(sp, runtime=True)
    batch_size(sp)
    sp.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative error (default 1e-4)")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("demo", help="train, bake and load a digits CNN at 100/50/25/10%% budgets")
    sp.add_argument("--backend", default="auto")
    sp.add_argument("--keep", metavar="DIR", help="keep the artifact as DIR/digits.stn, to go on with inspect, plan, "
                                                  "run and profile (default: a temporary folder, removed after)")
    sp.add_argument("--output", help="keep the artifact at this path")
    sp.add_argument("--epochs", type=int, default=20, help="regularized training epochs")
    sp.add_argument("--finetune-epochs", type=int, default=3, help="budget-sampled fine-tuning epochs (0: off)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("export", help="write the model at one budget as ONNX or TFLite for other toolchains")
    sp.add_argument("artifact", help="path to a .stn artifact")
    sp.add_argument("--mem-limit", default=None, help="bytes of weights: 8MB, 3MiB or 35%% (default: full model)")
    sp.add_argument("--format", choices=("onnx", "tflite"), help="default: from the suffix of -o")
    sp.add_argument("-o", "--output", required=True, help="file to write (.onnx or .tflite)")
    sp.add_argument("--batch", type=int, help="fix the batch axis to this size (ONNX default: symbolic; TFLite: 1)")
    sp.add_argument("--no-check", action="store_true", help="do not run the exported file against the runtime")
    sp.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative error (default 1e-4)")
    common(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("profile", help="latency, memory, error and FLOPs per budget on this device")
    common(sp, runtime=True)
    sp.add_argument("--budgets", default="100%,50%,25%,10%", help="comma-separated budgets (default 100%%,50%%,25%%,10%%)")
    sp.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    sp.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    sp.add_argument("--seconds", type=float, default=1.0, help="timed seconds per budget and batch (default 1)")
    sp.add_argument("--per-layer", action="store_true", help="also time every layer alone, dense and factorized")
    sp.add_argument("-o", "--output-dir", help="write profile.json, profile.png and the per-layer tables here")
    sp.set_defaults(func=cmd_profile)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except STNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        print(f"error: {exc.name} is not installed; the host commands need: pip install 'stn-edge[host]'", file=sys.stderr)
        return 5
    except BrokenPipeError:  # `stn-edge inspect x.stn | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
