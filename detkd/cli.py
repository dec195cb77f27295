"""The ``detkd`` command line.

Each command imports what it runs inside its function: ``import detkd.cli`` takes 0.1 s, while the
training loop pulls in torch and torchvision (``import detkd.engine.trainer``: 4 s, measured on the
2-core development machine), so ``detkd --help``, ``detkd configs`` and argument errors answer at once."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from detkd.config import (
    ConfigError,
    DigitsConfig,
    from_dict,
    list_shipped_configs,
    load_config,
    parse_value,
    shipped_configs,
)
from detkd.errors import BenchError, CheckpointError, DataError, RunStopped


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2 data.batch_size=4")


def cmd_train(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.engine.trainer import fit
    from detkd.runtime.console import result

    cfg = load_config(args.config, args.overrides)
    if args.command == "train" and cfg.distill is not None:
        raise ConfigError(f"{args.config} has a distill section: run it with `detkd distill`")
    if args.command == "distill" and cfg.distill is None:
        raise ConfigError(f"{args.config} has no distill section: run it with `detkd train`")
    metrics = fit(cfg, resume=args.resume, progress=not args.quiet)
    result(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.evaluation import format_metrics
    from detkd.runtime.console import result
    from detkd.runtime.dist import is_main

    cfg = load_config(args.config, args.overrides)
    metrics = evaluate_checkpoint(cfg, args.checkpoint, progress=not args.quiet)
    result(format_metrics(metrics))
    if args.json and is_main():
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def parse_sets(items: list[str] | None) -> dict[str, object]:
    """``--set key=value`` options as a mapping, each value parsed as in a config override."""
    params = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        params[k] = parse_value(v)
    return params


def cmd_data_digits(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.data.digits import make_digits

    cfg = from_dict(DigitsConfig, parse_sets(args.set), "digits")
    out = make_digits(args.out, cfg)
    print(f"digits data set written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.commands.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.engine.pretrain import PretrainOptions, pretrain_backbone
    from detkd.runtime.console import result

    opts = from_dict(PretrainOptions, parse_sets(args.set), "pretrain")
    for backbone in args.backbones:
        result(str(pretrain_backbone(backbone, args.out, opts, progress=not args.quiet)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.commands.export import export_student

    paths = export_student(args.run_dir, args.out, checkpoint=args.checkpoint, torchscript=args.torchscript,
                           onnx=args.onnx)
    for p in paths:
        print(p)
    return 0


def cmd_configs(args: argparse.Namespace) -> int:

    print(f"# shipped configs in {shipped_configs()}; run one by name: detkd train digits/retinanet_r18_student")
    for name in list_shipped_configs():
        print(name)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.commands.predict import predict_images

    summary = predict_images(args.model, args.inputs, args.out, score=args.score, checkpoint=args.checkpoint,
                             device=args.device, names_file=args.names, progress=not args.quiet)
    if summary.images == 0:
        print(f"detkd: error: none of the {len(summary.skipped)} images could be read", file=sys.stderr)
        return 1
    return 0


def cmd_prototypes(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.commands.prototypes import export_prototypes
    from detkd.runtime.console import result

    cfg = load_config(args.config, args.overrides)
    out = export_prototypes(cfg, args.checkpoint, args.out)
    result(f"prototypes written to {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.commands.detections import compare_detections, parse_model_specs
    from detkd.commands.relations import analyze_relations

    cfg = load_config(args.config, args.overrides)
    if args.analyze_command == "relations":
        analyze_relations(cfg, args.checkpoint, args.out, k=args.k, images=args.images, seed=args.seed,
                          kmeans_space=args.kmeans_space)
        print(f"relation discrepancies written to {args.out}")
    else:
        out = compare_detections(cfg, parse_model_specs(args.model or []), args.out, images=args.images,
                                 score=args.score, ground_truth=args.gt, teacher=not args.no_teacher,
                                 cell=args.cell)
        print(f"detections written to {out}")
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="the paper's analyses: relation discrepancy (Fig. 1), detections (Fig. 3)")
    asub = p.add_subparsers(dest="analyze_command", required=True)
    r = asub.add_parser("relations", help="Fig. 1 (right): teacher/student discrepancy of relations to "
                        "prototypes, random instances and K-means centres, as histograms (docs/analysis.md)")
    _add_config(r)
    r.add_argument("--checkpoint", required=True, help="student checkpoint (CONFIG is its distill config)")
    r.add_argument("--out", required=True, help="folder for relations.png / .json / .pt")
    r.add_argument("--k", type=int, help="bases per class and level (default: the run's prototype k)")
    r.add_argument("--images", type=int, help="images per class in the instance pool (default: the run's "
                   "max_images_per_class; 0 = all)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random and K-means bases")
    r.add_argument("--kmeans-space", choices=("teacher", "student"), default="teacher")
    r.set_defaults(func=cmd_analyze)
    d = asub.add_parser("detections", help="Fig. 3: detections of several models side by side on val images")
    _add_config(d)
    d.add_argument("--model", action="append", metavar="LABEL=CKPT",
                   help="a column: label and checkpoint (student model, or teacher model if it does not fit); "
                   "repeat for more")
    d.add_argument("--out", required=True, help="PNG file (a .json listing goes next to it)")
    d.add_argument("--images", type=int, default=4, help="first N validation images, one row each")
    d.add_argument("--score", type=float, default=0.3, help="draw detections with at least this score")
    d.add_argument("--gt", action="store_true", help="add a ground-truth column")
    d.add_argument("--no-teacher", action="store_true", help="leave out the config's teacher column")
    d.add_argument("--cell", type=int, default=256, help="px of a grid cell")
    d.set_defaults(func=cmd_analyze)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_bench(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.bench import run_bench

    only = [m for m in args.methods.split(",") if m] if args.methods else None
    seeds = [int(x) for x in args.seeds.split(",") if x] if args.seeds else None
    # SIGTERM as an exception, so that the bench stops the run it is waiting for (bench.run.execute)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run_bench(args.config, args.overrides, only=only, seeds=seeds, dry_run=args.dry_run,
                  quiet=not args.progress, report_only=args.report, jobs=args.jobs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    # lazy: torch start-up (module docstring)
    from detkd.distill.describe import format_method, format_methods, registry

    if args.name is None:
        print(format_methods())
        return 0
    if args.name not in registry():
        raise ConfigError(f"unknown method {args.name!r} (known: {', '.join(registry())})")
    print(format_method(args.name))
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="run a trained detector on image files or folders: drawn images and "
                       "a COCO-results JSON")
    p.add_argument("model", help="training checkpoint (.pt), run folder, or exported student folder")
    p.add_argument("inputs", nargs="+", help="image files and / or folders of images")
    p.add_argument("--out", required=True, help="folder for the drawn images and detections.json")
    p.add_argument("--score", type=float, default=0.3, help="keep detections with at least this score")
    p.add_argument("--checkpoint", default="best.pt", help="file of a run folder (default best.pt, falling "
                   "back to last.pt)")
    p.add_argument("--names", help="class names: a COCO json (its categories) or a text file, one per line")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="detkd", description="Knowledge distillation for torchvision detectors")
    sub = ap.add_subparsers(dest="command", required=True)

    for name, helptext in (("train", "train a detector"), ("distill", "distil a student from a frozen teacher")):
        p = sub.add_parser(name, help=helptext)
        _add_config(p)
        p.add_argument("--resume", action="store_true", help="continue the run in output_dir from last.pt")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="compare distillation methods on one teacher/student pair: table and plots")
    p.add_argument("config", help="bench file (e.g. configs/bench/digits_retinanet.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the bench file (e.g. epochs=2)")
    p.add_argument("--methods", help="comma-separated rows to run (default: all of the bench file)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the bench file's)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished, run nothing")
    p.add_argument("--report", action="store_true",
                   help="write and print the table and plots of the runs finished so far, run nothing")
    p.add_argument("--progress", action="store_true", help="progress bars of every run in its log")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1); on CPU give each its share of "
                   "the cores with train.threads")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("methods", help="list the distillation methods, or one method's options and defaults")
    p.add_argument("name", nargs="?", help="a method's registry name (e.g. pkd): print its options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("eval", help="evaluate a checkpoint (training or exported) on the val split")
    _add_config(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="data set tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("digits", help="write the embedded digits data set in COCO format")
    d.add_argument("out")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="digits parameter, e.g. --set image_size=96 --set train_images=500")
    d.set_defaults(func=cmd_data_digits)

    p = sub.add_parser("pretrain", help="pre-train backbones as digit classifiers (the digits benches' stand-in "
                       "for ImageNet weights), for model.backbone_weights")
    p.add_argument("backbones", nargs="+", help="torchvision trunks, e.g. resnet18 resnet34")
    p.add_argument("--out", default="runs/pretrain/digits", help="folder for BACKBONE.pt / .json (default "
                   "runs/pretrain/digits, where the shipped digits configs look)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="pre-training option, e.g. --set epochs=4 --set images=4000 (docs/bench.md)")
    p.add_argument("--quiet", action="store_true", help="epoch lines only")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="offline end-to-end demo on the digits data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write the student of a run as a plain torchvision state dict")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--checkpoint", default="best.pt", help="file in RUN_DIR to export (default best.pt, "
                   "falling back to last.pt)")
    p.add_argument("--torchscript", action="store_true")
    p.add_argument("--onnx", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("configs", help="list the configs shipped with detkd (usable by name without a clone)")
    p.set_defaults(func=cmd_configs)

    _add_predict(sub)

    p = sub.add_parser("prototypes", help="select prototypes with a trained pair and save them with a gallery")
    _add_config(p)
    p.add_argument("--checkpoint", required=True, help="student checkpoint")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prototypes)

    _add_analyze(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (``eval CONFIG --checkpoint X train.device=cpu``)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"detkd: error: {e}", file=sys.stderr)
        return 2
    except (RunStopped, BenchError) as e:  # non-finite losses, a failed DDP collective, a failed bench run
        print(f"detkd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("detkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`detkd methods | head`): not an error of ours; stdout is pointed
        # at /dev/null so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
