"""The `vlpt` command (also `python -m vlpt`): pretrain, finetune, evaluate, config, demo-data, shards, tasks,
vocab, convert, launch, bench.

User errors (bad config key or type, missing file) end the process with one
line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.config_files import ConfigError
from trainer.errors import RunAborted, RunStopped

EXIT_USER_ERROR = 2
EXIT_RUN_ABORTED = 3


def split_overrides(extra: list[str]) -> list[str]:
    """Dotted `--section.key=value` overrides; launcher flags (`--local_rank`) are ignored."""
    overrides = []
    for arg in extra:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            continue  # the DeepSpeed launcher adds it; we read LOCAL_RANK from the environment
        if not (arg.startswith("--") and "=" in arg and "." in arg.split("=", 1)[0]):
            raise ConfigError(f"unrecognised argument {arg!r}: overrides look like --optim.lr=1e-4")
        overrides.append(arg)
    return overrides


def _run_config(args, extra: list[str], stage: str):
    """The config of a `stage` run; one line naming the right command when it is the other stage's."""
    from trainer.config import load_config

    cfg = load_config(args.config, split_overrides(extra))
    if cfg.stage != stage:  # each stage has the command of its name
        raise ConfigError(f"{args.config} has stage: {cfg.stage}; run it with `vlpt {cfg.stage}`")
    return cfg


def cmd_pretrain(args, extra: list[str]) -> int:
    cfg = _run_config(args, extra, "pretrain")
    from trainer.run import pretrain

    pretrain(cfg)
    return 0


def cmd_finetune(args, extra: list[str]) -> int:
    cfg = _run_config(args, extra, "finetune")
    from trainer.run import pretrain

    pretrain(cfg)  # the same run machinery; the finetune recipe supplies data, model and metrics
    return 0


def cmd_evaluate(args, extra: list[str]) -> int:
    cfg = _run_config(args, extra, "finetune")
    from trainer.evaluate import evaluate

    evaluate(cfg, args.checkpoint, args.split, args.out)
    return 0


def cmd_demo_finetune(args, extra: list[str]) -> int:
    from trainer.demo_finetune import demo_finetune

    tasks = tuple(t for t in (args.tasks or "").split(",") if t)
    out = args.out or ("runs/demo-finetune" if args.family == "uniter" else f"runs/demo-finetune-{args.family}")
    try:
        demo_finetune(args.configs, out, tasks or None, tuple(split_overrides(extra)), args.family)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


def cmd_config(args, extra: list[str]) -> int:
    from trainer.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(args.config, split_overrides(extra))), end="")
    return 0


def cmd_demo_data(args, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
    out = args.out or ("demo_pixels" if args.pixels else "demo_data")
    common = dict(seed=args.seed, n_train_scenes=args.scenes, n_val_scenes=args.val_scenes, img_dim=args.img_dim)
    if args.tasks and args.pixels:
        raise ConfigError("--tasks writes the downstream tasks of the region demo data; leave out --pixels")
    if os.path.isfile(os.path.join(out, "train", "manifest.json")) and not args.force:
        print(f"{out} already holds the demo data (use --force to rewrite it)")
    else:
        _write_demo_shards(args, out, common)
    if args.tasks:
        _write_demo_tasks(out, common)
    return 0


def cmd_demo_vit(args, extra: list[str]) -> int:
    from trainer.config import load_config
    from trainer.demo_vit import DemoVitSettings, train_demo_vit

    cfg = load_config(args.config, split_overrides(extra))
    if cfg.model.arch != "albef":
        raise ConfigError(f"{args.config}: model.arch is {cfg.model.arch!r}; demo-vit trains an ALBEF image encoder")
    out = args.out or cfg.model.init_from_vit
    if not out:
        raise ConfigError(f"{args.config}: no model.init_from_vit to write to; pass --out")
    if os.path.isfile(os.path.join(out, "config.json")) and not args.force:
        print(f"{out} already holds a ViT (use --force to train it again)")
        return 0
    try:
        settings = DemoVitSettings(scenes=args.scenes, steps=args.steps, seed=args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"demo ViT written to {out}: {train_demo_vit(cfg.model, out, settings)}")
    return 0


def _write_demo_tasks(out: str, common: dict) -> None:
    from data.demo_scenes import DEFAULT_NOISE_STD
    from data.tasks.demo import write_demo_tasks

    regions = {split: os.path.join(out, split) for split in ("train", "val")}
    try:
        summary = write_demo_tasks(os.path.join(out, "tasks"), noise_std=DEFAULT_NOISE_STD, region_dirs=regions,
                                   **common)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"demo tasks written to {out}/tasks: {summary}")


def _write_demo_shards(args, out: str, common: dict) -> None:
    try:
        if args.pixels:
            from data.demo_pixels import write_demo_pixels

            summary = write_demo_pixels(out, image_size=args.image_size, **common)
        else:
            from data.demo import write_demo_dataset

            summary = write_demo_dataset(out, **common)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"demo data written to {out}: {summary}")


def cmd_shards(args, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
    from data import builders

    common = dict(samples_per_shard=args.samples_per_shard, workers=args.workers, progress=not args.no_progress,
                  allow_outside_root=getattr(args, "allow_outside_root", False))  # not for REGION_FORMATS
    try:
        if args.source == "coco":
            summary = builders.build_coco_shards(args.captions, args.images, args.out, **common)
        elif args.source == "regions":
            summary = builders.build_region_shards(args.features, args.captions, args.out, conf_th=args.conf_th,
                                                   min_bb=args.min_bb, max_bb=args.max_bb, **common)
        elif args.source in REGION_FORMATS:
            summary = _build_region_format(args)
        else:
            summary = builders.build_tsv_shards(args.tsv, args.out, **common)
    except ValueError as e:  # bad arguments or unusable inputs; bad samples are counted, never raised
        raise ConfigError(str(e)) from None
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    print(f"{summary['num_samples']} samples in {summary['num_shards']} shards ({summary['built']} built, "
          f"{summary['reused']} already done), {summary['bytes']} bytes -> {summary['manifest']}")
    if "num_pairs" in summary:  # picture shards: each picture once, with all its captions
        print(f"{summary['num_samples']} pictures, {summary['num_pairs']} picture-caption pairs; pictures "
              f"{summary['picture_bytes']} bytes (one sample per caption would store "
              f"{summary['picture_bytes_one_per_caption']})")
    print(f"skipped: {skipped}")
    if summary["skipped"].get("path_outside_root"):
        print("  (path_outside_root: source paths leading out of their folder; pass --allow-outside-root "
              "to read them)")
    return 0


def cmd_vocab_train(args, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
    from data.vocab import train_tokenizer

    try:
        summary = train_tokenizer(args.captions, args.size, args.out, lowercase=args.lowercase,
                                  min_frequency=args.min_frequency, force=args.force)
    except ValueError as e:  # bad arguments or no usable caption; bad lines are counted, never raised
        raise ConfigError(str(e)) from None
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    case = "uncased" if summary["lowercase"] else "cased"
    print(f"{summary['vocab_size']} word pieces ({case}) from {summary['captions']} captions -> {summary['out']} "
          f"(skipped: {skipped})")
    print(f"use it with: data.tokenizer.path={summary['out']} and model.vocab_size={summary['vocab_size']}")
    return 0


def cmd_convert(args, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
    from trainer.models.convert_cli import run_convert

    return run_convert(args)


def cmd_launch(args, extra: list[str]) -> int:
    from cluster.launch import launch

    mode = "dry-run" if args.dry_run else "submit" if args.submit else "render"
    return launch(args.launcher, args.config, split_overrides(extra), mode, cluster=args.cluster, out=args.out,
                  nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc,
                  master_port=args.master_port)


def cmd_bench_data(args, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
    from data.bench import BenchConfig, format_result, run_bench
    from data.storage import S3Options

    sources = tuple(s for s in (args.data, args.s3) if s)
    return _bench("data", args.out, format_result, lambda: run_bench(BenchConfig(
        sources=sources, vocab=args.vocab, task=args.task, batch_size=args.batch_size,
        token_budget=args.token_budget, workers=args.workers, shuffle_buffer=args.shuffle_buffer,
        max_samples=args.max_samples, pack_len=args.pack_len,
        s3=S3Options(endpoint_url=args.endpoint_url, region=args.region))))


def _bench(kind: str, out: str, fmt, run) -> int:
    """Run a benchmark (its bad settings: one line, exit 2), print it, and record it under `out`."""
    from trainer.bench_record import stamp, write_record

    try:
        result = run()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(fmt(result))
    print(f"written to {write_record(stamp(kind, result), out)}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_bench_kernels(args, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
    from kernels.bench import KernelBenchConfig, format_kernel_result, run_kernel_bench

    return _bench("kernels", args.out, format_kernel_result, lambda: run_kernel_bench(KernelBenchConfig(
        **({"device": args.device} if args.device else {}), batch_sizes=args.batch_sizes,
        words=args.words, regions=args.regions, ragged_batch=args.ragged_batch, hidden=args.hidden,
        iterations=args.iterations, reps=args.reps, warmup=args.warmup, pot=not args.no_pot,
        ops=tuple(args.ops.split(",")), gather_dtype=args.gather_dtype)))


def cmd_bench_train(args, extra: list[str]) -> int:
    import time

    from trainer.bench_record import stamp, write_record
    from trainer.bench_train import TrainBenchConfig, format_train_result, run_train_bench
    from trainer.config import load_config

    cfg = load_config(args.config, split_overrides(extra))
    main = int(os.environ.get("RANK", "0")) == 0
    kind = "train-sweep" if args.sweep else "train"
    # one file, rewritten after every sweep point: a sweep cut short keeps the points it ran
    out = args.out or time.strftime(f"benchmarks/results/{kind}-%Y%m%d-%H%M%S.json")

    def record(result: dict) -> str:
        return write_record(stamp(kind, {"config": args.config, **result}), out) if main else out

    try:
        bench = TrainBenchConfig(steps=args.steps, warmup=args.warmup, batches_per_task=args.batches_per_task,
                                 profile_steps=args.profile_steps)
        if args.sweep:
            if args.count_only:
                raise ValueError("bench train: --count-only counts the config's own batches; drop --sweep")
            from trainer.bench_sweep import format_sweep, run_sweep

            fmt, result = format_sweep, run_sweep(cfg, bench, args.sweep, on_point=record)
        else:
            fmt, result = format_train_result, run_train_bench(cfg, bench, args.count_only)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if main:
        print(fmt(result))
        print(f"written to {record(result)}")
    return 0


def _add_bench_train(bench) -> None:
    sp = bench.add_parser("train", help="training steps/s, samples/s, tokens/s, MFU, peak memory: ours vs the "
                                        "plain way")
    sp.add_argument("--config", required=True, help="pretraining YAML; dotted --section.key=value overrides follow")
    sp.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    sp.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    sp.add_argument("--batches-per-task", type=int, default=4, help="steps' worth of batches read per task, cycled")
    sp.add_argument("--profile-steps", type=int, default=0,
                    help="after timing, profile this many more steps per side (torch.profiler; top ops in the JSON)")
    sp.add_argument("--sweep", type=_ints, default=(),
                    help="micro-batch sizes in real tokens per GPU, e.g. 8192,16384,32768: both sides at each "
                         "(default JSON benchmarks/results/train-sweep-<time>.json)")
    sp.add_argument("--count-only", action="store_true",
                    help="print the timed steps' samples, tokens and useful / padded FLOPs; no training")
    sp.add_argument("--out", help="JSON path (default benchmarks/results/train-<time>.json)")
    sp.set_defaults(fn=cmd_bench_train)


def _add_bench_kernels(bench) -> None:
    sp = bench.add_parser("kernels", help="fused IPOT / Sinkhorn / masked gather vs eager torch and POT")
    sp.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    sp.add_argument("--batch-sizes", type=_ints, default=(32, 64, 128, 256))
    sp.add_argument("--words", type=_ints, default=(20, 40, 60))
    sp.add_argument("--regions", type=_ints, default=(36, 64, 100))
    sp.add_argument("--ragged-batch", type=int, default=128, help="B of the extra ragged case (0: none)")
    sp.add_argument("--hidden", type=int, default=768)
    sp.add_argument("--iterations", type=int, default=50, help="IPOT / Sinkhorn iterations (all solvers)")
    sp.add_argument("--reps", type=int, default=20, help="timed calls per measurement (median)")
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--no-pot", action="store_true", help="leave POT's batched solvers out")
    sp.add_argument("--ops", default="ipot,sinkhorn,gather")
    sp.add_argument("--gather-dtype", choices=["", "bf16", "fp16", "fp32"], default="",
                    help="hidden dtype for the gather (default bf16 on CUDA, fp32 on CPU)")
    sp.add_argument("--out", help="JSON path (default benchmarks/results/kernels-<time>.json)")
    sp.set_defaults(fn=cmd_bench_kernels)


def _add_launch(sub) -> None:
    sp = sub.add_parser("launch", help="render (and submit) a `vlpt pretrain` job: torchrun, DeepSpeed, Slurm, "
                                       "Kubernetes", description="render a job from the run config (plus "
                                       "--section.key=value overrides) and the cluster YAML into "
                                       "<run_dir>/launch/; the job reads a frozen copy of the config")
    sp.add_argument("launcher", choices=["local", "deepspeed", "slurm", "k8s"],
                    help="local = torchrun here; deepspeed = DeepSpeed launcher (hostfile); slurm = sbatch "
                         "script; k8s = Kubeflow PyTorchJob")
    sp.add_argument("--config", required=True, help="run config YAML")
    sp.add_argument("--cluster", help="cluster YAML (configs/cluster/*.yaml); flags below override it")
    sp.add_argument("--nodes", type=int)
    sp.add_argument("--gpus-per-node", type=int, help="one process per GPU; 0 = CPU job (gloo)")
    sp.add_argument("--nproc", type=int, help="processes per node (default: --gpus-per-node, 1 on CPU)")
    sp.add_argument("--master-port", type=int)
    sp.add_argument("--out", help="folder for the rendered files (default <run_dir>/launch)")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the rendered files; write nothing")
    mode.add_argument("--submit", action="store_true", help="write, then run sbatch / kubectl apply / the launcher")
    sp.set_defaults(fn=cmd_launch)


def _add_run_commands(sub) -> None:
    for name, fn, text in (("pretrain", cmd_pretrain, "run pretraining from a YAML config"),
                           ("finetune", cmd_finetune, "fine-tune on a downstream task (a `stage: finetune` config)"),
                           ("evaluate", cmd_evaluate, "score a fine-tuned checkpoint and write its predictions file"),
                           ("config", cmd_config, "print the resolved config and exit")):
        sp = sub.add_parser(name, help=text, description=f"{text}; add --section.key=value overrides")
        sp.add_argument("--config", required=True, help="YAML file (may `include:` others)")
        if name == "evaluate":
            sp.add_argument("--checkpoint", required=True, help="a `vlpt finetune` run or checkpoint folder, or a "
                                                                "state-dict file")
            sp.add_argument("--split", help="task folder to score (default: finetune.val)")
            sp.add_argument("--out", help="folder for the predictions and metrics.json (default <run_dir>/eval)")
        sp.set_defaults(fn=fn)


def _add_tasks(sub) -> None:
    from data.tasks.official_cli import add_task_builder_commands

    add_task_builder_commands(sub)


def _add_demo_finetune(sub) -> None:
    sp = sub.add_parser("demo-finetune", help="fine-tune the `make demo` (or `make demo-albef`) model on every "
                                              "demo task and from scratch; print the metrics table")
    sp.add_argument("--family", choices=("uniter", "albef"), default="uniter",
                    help="uniter: the six demo tasks from runs/demo; albef: retrieval and VE from runs/demo-albef")
    sp.add_argument("--tasks", help="comma-separated demo tasks (default: all of the family's)")
    sp.add_argument("--configs", default="configs/finetune",
                    help="folder of the demo-<task>.yaml / demo-albef-<task>.yaml configs")
    sp.add_argument("--out", help="run folders and table.{md,json} (default runs/demo-finetune[-albef])")
    sp.set_defaults(fn=cmd_demo_finetune)


def _add_demo_data(sub) -> None:
    sp = sub.add_parser("demo-data", help="write the deterministic demo shards")
    sp.add_argument("--out", help="default demo_data (regions) or demo_pixels (--pixels)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--scenes", type=int, default=2000, help="training scenes (2 captions each)")
    sp.add_argument("--val-scenes", type=int, default=250, help="held-out scenes")
    sp.add_argument("--img-dim", type=int, default=64, help="region feature size")
    sp.add_argument("--pixels", action="store_true", help="the same scenes and captions as PNG pictures (ALBEF)")
    sp.add_argument("--image-size", type=int, default=96, help="--pixels: side of the pictures")
    sp.add_argument("--force", action="store_true", help="rewrite existing data")
    sp.add_argument("--tasks", action="store_true", help="also write the demo downstream tasks (<out>/tasks/<task>/"
                                                         "{train,val}) on the same scenes")
    sp.set_defaults(fn=cmd_demo_data)


def _add_demo_vit(sub) -> None:
    sp = sub.add_parser("demo-vit", help="train the pixel demo's image encoder (its stand-in for ALBEF's DeiT) on "
                                         "pictures of its own scenes; writes the model.init_from_vit directory")
    sp.add_argument("--config", default="configs/pretrain/demo-albef.yaml",
                    help="an ALBEF config: its model.vision_* sizes, and its model.init_from_vit as the output")
    sp.add_argument("--out", help="write the ViT here instead of the config's model.init_from_vit")
    sp.add_argument("--scenes", type=int, default=6000, help="pictures (the first 500 held out to measure)")
    sp.add_argument("--steps", type=int, default=800)
    sp.add_argument("--seed", type=int, default=7, help="scene stream; the demo data's is 0")
    sp.add_argument("--force", action="store_true", help="train again over an existing directory")
    sp.set_defaults(fn=cmd_demo_vit)


def _add_shards(sub) -> None:
    sp = sub.add_parser("shards", help="build webdataset shards + manifest from COCO, region npz or TSV data")
    shard_sub = sp.add_subparsers(dest="source", required=True)
    coco = shard_sub.add_parser("coco", help="COCO-captions JSON + image folder -> pixel shards")
    coco.add_argument("--captions", required=True, help="captions_*.json ({images, annotations})")
    coco.add_argument("--images", required=True, help="folder the images' file_name is relative to")
    regions = shard_sub.add_parser("regions", help="<image_id>.npz region features + captions -> region shards")
    regions.add_argument("--features", required=True, help="folder of <image_id>.npz files")
    regions.add_argument("--captions", required=True, help="COCO captions JSON or a list of {image_id, caption}")
    regions.add_argument("--conf-th", type=float, default=0.2, help="boxes above it count as confident")
    regions.add_argument("--min-bb", type=int, default=10, help="keep at least this many boxes (if present)")
    regions.add_argument("--max-bb", type=int, default=100, help="keep at most this many boxes")
    tsv = shard_sub.add_parser("tsv", help="local_image_path<TAB>caption lines -> pixel shards")
    tsv.add_argument("--tsv", required=True, help="relative image paths are resolved against its folder")
    for q in (coco, regions, tsv):
        q.add_argument("--out", required=True, help="output folder (shards, manifest.json)")
        q.add_argument("--samples-per-shard", type=int, default=1000)
        q.add_argument("--workers", type=int, default=1, help="processes building shards in parallel")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.add_argument("--allow-outside-root", action="store_true",
                       help="read source files that the annotations place outside the image/feature/TSV folder")
        q.set_defaults(fn=cmd_shards)
    _add_region_format_shards(shard_sub)


REGION_FORMATS = ("butd-tsv", "uniter-lmdb", "lmdb-features")
"""`vlpt shards` sources read by data/region_formats (docs/data.md, "Region feature formats")."""


def _build_region_format(args) -> dict:
    from data.region_formats.butd_tsv import build_butd_tsv_shards
    from data.region_formats.lmdb_features import build_lmdb_feature_shards
    from data.region_formats.uniter_lmdb import build_uniter_lmdb_shards

    common = dict(conf_th=args.conf_th, min_bb=args.min_bb, max_bb=args.max_bb,
                  samples_per_shard=args.samples_per_shard, workers=args.workers, progress=not args.no_progress)
    if args.source == "butd-tsv":
        return build_butd_tsv_shards(args.tsv, args.captions, args.out, fields=args.fields, **common)
    if args.source == "uniter-lmdb":
        return build_uniter_lmdb_shards(args.img_db, args.txt_db, args.out, **common)
    return build_lmdb_feature_shards(args.lmdb, args.captions, args.out, **common)


def _add_region_format_shards(shard_sub) -> None:
    butd = shard_sub.add_parser("butd-tsv", help="bottom-up-attention TSV (base64 fields) + captions -> region shards")
    butd.add_argument("--tsv", required=True, nargs="+", help="TSV file(s), one row per image")
    butd.add_argument("--fields", default="butd",
                      help="field names: butd (image_id,image_w,image_h,num_boxes,boxes,features), lxmert, or a "
                           "comma-separated list (cls_prob -> soft labels, objects_conf -> conf)")
    uniter = shard_sub.add_parser("uniter-lmdb", help="UNITER img_db + txt_db (LMDB) -> region shards")
    uniter.add_argument("--img-db", required=True, help="UNITER img_db folder (or the LMDB folder in it)")
    uniter.add_argument("--txt-db", required=True, help="UNITER txt_db folder (its captions' text is re-tokenised)")
    lmdb = shard_sub.add_parser("lmdb-features", help="detectron2-style feature LMDB + captions -> region shards")
    lmdb.add_argument("--lmdb", required=True, help="LMDB folder (data.mdb): image id -> msgpack / npz record")
    for q in (butd, lmdb):
        q.add_argument("--captions", required=True, help="COCO captions JSON or a list of {image_id, caption}")
    for q in (butd, uniter, lmdb):
        q.add_argument("--conf-th", type=float, default=0.2, help="boxes above it count as confident (with conf)")
        q.add_argument("--min-bb", type=int, default=10, help="keep at least this many boxes (if present)")
        q.add_argument("--max-bb", type=int, default=100, help="keep at most this many boxes")
        q.add_argument("--out", required=True, help="output folder (shards, manifest.json)")
        q.add_argument("--samples-per-shard", type=int, default=1000)
        q.add_argument("--workers", type=int, default=1, help="processes building shards in parallel")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(fn=cmd_shards)


def _add_vocab(sub) -> None:
    sp = sub.add_parser("vocab", help="word-piece tokenizers for your own captions")
    vocab_sub = sp.add_subparsers(dest="vocab_command", required=True)
    train = vocab_sub.add_parser("train", help="train a WordPiece tokenizer on caption files -> a Hugging Face "
                                               "tokenizer directory for data.tokenizer.path")
    train.add_argument("--captions", nargs="+", required=True,
                       help=".json (COCO captions or a list of {image_id, caption}, as `vlpt shards`), .jsonl "
                            "({\"caption\": ...} a line), .tsv (image_path<TAB>caption) or text (one a line)")
    train.add_argument("--size", type=int, required=True, help="word pieces, special tokens included (BERT: 30522)")
    train.add_argument("--out", required=True,
                       help="output directory (tokenizer.json, vocab.txt, tokenizer_config.json)")
    train.add_argument("--lowercase", action="store_true", help="lower-case and strip accents (uncased, as ALBEF)")
    train.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a merge")
    train.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    train.set_defaults(fn=cmd_vocab_train)


def _add_convert(sub) -> None:
    sp = sub.add_parser("convert", help="import / export UNITER checkpoints; export ALBEF runs")
    sp.add_argument("direction", choices=["import", "export"],
                    help="import: UNITER model_step_*.pt -> ours; export: ours -> UNITER's (or, for an ALBEF "
                         "run, ALBEF's) key names")
    sp.add_argument("--src", required=True, help="input file (state dict) or our checkpoint directory")
    sp.add_argument("--dst", required=True, help="output .pt file")
    sp.set_defaults(fn=cmd_convert)


def _add_bench_data(bench) -> None:
    data = bench.add_parser("data", help="input pipeline samples/s (local, S3) and padding of the batchings")
    data.add_argument("--data", default="demo_data/train", help="local shard directory (with manifest.json)")
    data.add_argument("--s3", help="also read this s3://bucket/prefix (the same data, uploaded)")
    data.add_argument("--endpoint-url", help="S3 API endpoint (MinIO, moto, ...); credentials from the AWS chain")
    data.add_argument("--region")
    data.add_argument("--vocab", default="data/vocab/demo-vocab.txt")
    data.add_argument("--task", choices=["mlm", "itm"], default="mlm", help="masking + collate to include")
    data.add_argument("--batch-size", type=int, default=32, help="fixed-size batches")
    data.add_argument("--token-budget", type=int, default=2048, help="token buckets: longest row x size")
    data.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    data.add_argument("--shuffle-buffer", type=int, default=512)
    data.add_argument("--max-samples", type=int, default=0, help="stop each pass here (0: one epoch)")
    data.add_argument("--pack-len", type=int, default=0,
                      help="also pack the fixed-size batches into rows of this many positions (a multiple of 8, "
                           "as data.uniter.pack_len) and report their padding; 0: skip")
    data.add_argument("--out", help="JSON path (default benchmarks/results/data-<time>.json)")
    data.set_defaults(fn=cmd_bench_data)


def _add_bench(sub) -> None:
    sp = sub.add_parser("bench", help="measure a part of the system")
    bench = sp.add_subparsers(dest="what", required=True)
    _add_bench_data(bench)
    _add_bench_kernels(bench)
    _add_bench_train(bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpt", description="vision-and-language pretraining")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_demo_data(sub)
    _add_demo_finetune(sub)
    _add_demo_vit(sub)
    _add_shards(sub)
    _add_tasks(sub)
    _add_vocab(sub)
    _add_convert(sub)
    _add_launch(sub)
    _add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.fn(args, extra)
    except ConfigError as e:
        print(f"vlpt: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunAborted as e:
        print(f"vlpt: error: {e}", file=sys.stderr)
        return EXIT_RUN_ABORTED
    except RunStopped as e:
        print(f"vlpt: {e}", file=sys.stderr)
        return e.exit_code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
