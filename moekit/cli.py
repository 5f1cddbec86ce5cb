"""The `moekit` command: thin subcommands over the packages (nothing imports this module)."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_PRESET = "tiny-mixtral"


def preset_names() -> list[str]:
    """Names of the presets shipped in `moekit/configs/`."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("moekit.configs").iterdir()
                  if p.name.endswith(".yaml"))


def _yaml_loader():
    """PyYAML's safe loader, reading floats as YAML 1.2 does (`1e-3` is a number, not the text '1e-3')."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    Loader.yaml_implicit_resolvers = {  # integers stay integers: the int resolver must win for plain digits
        key: sorted(resolvers, key=lambda r: r[0] != "tag:yaml.org,2002:int")
        for key, resolvers in Loader.yaml_implicit_resolvers.items()}
    return Loader


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as error:
        raise ImportError(f"reading {source} needs PyYAML, which is not installed: pip install \"moekit[train]\""
                          ) from error
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as error:
        raise ValueError(f"{source} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a mapping with 'model' and 'train' sections")
    return data


def load_run_dict(preset: str | None, config: str | None) -> dict[str, Any]:
    """The raw run config from `--preset NAME` or `--config FILE` (default: the default preset)."""
    if preset and config:
        raise ValueError("pass either --preset or --config, not both")
    if config:
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} not found; pass a YAML or JSON run config")
        if not path.is_file():  # a folder, a FIFO or a device: never opened, so nothing can block
            raise ValueError(f"config file {path} is not a regular file; pass a YAML or JSON run config")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"config file {path} is not text ({error}); pass a YAML or JSON run config") from None
        if path.suffix != ".json":
            return _read_yaml(text, str(path))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold an object with 'model' and 'train' sections")
        return data
    name = preset or DEFAULT_PRESET
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _read_yaml(resources.files("moekit.configs").joinpath(f"{name}.yaml").read_text(), f"preset {name}")


def _train_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run config dict a `moekit train` invocation describes (nothing read but configs and checkpoints)."""
    from .train.config import apply_overrides
    from .train.init_from import init_from_values
    from .train.rundir import read_run_config

    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.ep is not None:
        overrides.append(f"train.expert_parallel={args.ep}")
    if args.resume and args.init_from:
        raise ValueError("--init-from starts a new run from a checkpoint folder and --resume continues a run (whose "
                         "config.json already names the folder it started from); pass one of them")
    if args.resume:
        given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config), ("--out", args.out),
                                          ("--overwrite", args.overwrite)) if value]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --resume: a resumed run continues with its "
                             "own config.json (change what a resume honours with --set; see README, 'What moekit "
                             "guarantees')")
        return apply_overrides(read_run_config(Path(args.resume)), overrides)
    if args.extend_schedule:
        raise ValueError("--extend-schedule applies to --resume only; a new run plans its schedule from max_steps")
    values = load_run_dict(args.preset, args.config)
    if args.init_from:
        values["train"] = {**(values.get("train") or {}), "init_from": args.init_from}  # --set still wins
    # a new run with train.init_from takes its model section from the checkpoint folder
    return init_from_values(values, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .extras import require
    from .train.config import RunConfig
    from .train.loop import Trainer
    from .train.report import write_report

    require("train")  # every missing package named now, before any config or file is read
    run = RunConfig.from_dict(_train_values(args))
    t = run.train
    if run.uses_transformers:  # transformers' own class is the model
        require("train", also=("tokenizers", "transformers"), extra="train,hf")
    elif t.tokenizer in ("bpe", "hf") or t.init_from:
        require("train", also=("tokenizers",))
    if args.stop_at is not None and not 0 < args.stop_at <= t.max_steps:
        raise ValueError(f"--stop-at {args.stop_at} is not allowed: a step in [1, max_steps={t.max_steps}]")
    run_dir = Path(args.resume) if args.resume else (Path(args.out) if args.out else Path("runs") / run.name)
    trainer = Trainer(run, run_dir, resume=bool(args.resume), overwrite=args.overwrite,
                      progress=not args.no_progress, extend_schedule=args.extend_schedule)
    main = trainer.is_main  # under torchrun only rank 0 prints and writes the report
    total, active = trainer.num_parameters
    layout = trainer.parallel.layout_note()
    if main:
        print(f"moekit train: {run.name} -> {run_dir} ({total:,} parameters, {active:,} active per token, "
              f"device {trainer.device}{', ' + layout if layout else ''})")
    extra = {"parameters (total / active)": f"{total:,} / {active:,}"}
    if trainer.frozen:
        frozen = total - trainer.num_trainable
        if main:
            print(f"moekit train: {trainer.num_trainable:,} parameters train, {frozen:,} frozen "
                  f"({len(trainer.frozen)} tensors: train.freeze_router / train_only_router / freeze)")
        extra["parameters (trainable / frozen)"] = f"{trainer.num_trainable:,} / {frozen:,}"
    if run.uses_transformers:
        model = trainer.model
        if main:
            print(f"moekit train: transformers' {type(model.model).__name__} with experts_implementation="
                  f"{run.model.experts_implementation!r}; balancing: Switch coef {model.aux_coef:g}, z-loss "
                  f"{model.z_coef:g}, sequence-wise {model.seq_coef:g}, selection-bias rate {model.bias_rate:g}")
        extra["model"] = f"transformers' `{type(model.model).__name__}` (train.backend=transformers)"
        extra["balancing"] = (f"Switch {model.aux_coef:g}, z-loss {model.z_coef:g}, sequence-wise {model.seq_coef:g}, "
                              f"selection-bias update rate {model.bias_rate:g}")
    if layout:
        extra["layout"] = layout
    if run.train.init_from is not None and main:
        print(f"initialised from {run.train.init_from} (weights and tokenizer.json)")
        extra["initialised from"] = f"`{run.train.init_from}`"
    try:
        result = trainer.train(stop_at=args.stop_at)
    finally:
        trainer.parallel.close()
    if main:
        report = write_report(run_dir, extra)
        if result.forced:
            print(f"stopped during a step; the last checkpoint is step {result.step}, report {report}")
        else:
            state = "interrupted at" if result.interrupted else "finished"
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"{state} step {result.step}{val}; checkpoint in {run_dir / 'checkpoints'}, report {report}")
    return 130 if result.interrupted else 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .extras import require
    from .model.generate import generate

    require("generate")
    from .train.load import load_run

    run, model, tokenizer = load_run(args.run_dir)
    hf_tokenizer = hasattr(tokenizer, "encode_prompt")  # a pretrained tokenizer adds its BOS, as transformers does
    ids = tokenizer.encode_prompt(args.prompt) if hf_tokenizer else tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; pass --prompt with some text")
    if run.uses_transformers:  # transformers' own class generates with its own cache
        from .hf.causal_lm import hf_generate

        out = hf_generate(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    else:
        out = generate(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    new_ids = out[0].tolist()
    if hf_tokenizer:
        known = [i for i in new_ids if i < tokenizer.vocab_size]
        if len(known) < len(new_ids):
            print(f"note: {len(new_ids) - len(known)} sampled id(s) are embedding rows beyond the tokenizer's "
                  f"{tokenizer.vocab_size} tokens (the checkpoint's padding rows); they are left out", file=sys.stderr)
        text = tokenizer.decode(known, skip_special_tokens=True)
    else:
        text = tokenizer.decode(new_ids)
    print(text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .extras import require
    from .train.config import RunConfig, apply_overrides
    from .train.loop import Trainer
    from .train.rundir import read_run_config

    require("eval")
    path = Path(args.run_dir)
    values = read_run_config(path, "evaluate")
    # one process evaluates any run, whatever --ep trained it (its checkpoint joins the expert slices); it reads
    # only the weights and writes nothing
    run = RunConfig.from_dict(apply_overrides(values, [f"train.eval_batches={args.batches}",
                                                       "train.expert_parallel=1"]))
    trainer = Trainer(run, path, resume=True, progress=False, read_only=True)
    record = trainer.evaluate()
    print(f"val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.2f}")
    if "val_load" in record:
        print(f"MaxVio on val (mean over MoE layers): {record['val_max_violation']:.3f}")
        for layer, load in record["val_load"].items():
            total = sum(load) or 1.0
            shares = " ".join(f"{v / total:.2f}" for v in load)
            print(f"  layer {layer} expert shares: {shares}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import info_from_model_config, load_info_source

    if args.source in preset_names() and not Path(args.source).exists():
        from .train.config import RunConfig

        info = info_from_model_config(RunConfig.from_dict(load_run_dict(args.source, None)).model,
                                      context=args.context, batch=args.batch)
    else:
        info = load_info_source(args.source, context=args.context, batch=args.batch)
    print(info.format())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .extras import require
    from .interop import export_hf
    from .interop.outputs import check_output

    require("export")
    # the run is an input: OUT may not be, contain or lie inside it (checked before the model is even loaded)
    check_output(args.out, overwrite=args.overwrite, caller="export_hf", inputs=[args.run_dir], label="out_dir")
    from .train.load import load_run

    run, model, _ = load_run(args.run_dir)
    tokenizer_dir = Path(args.run_dir) / "tokenizer"
    has_hf_tokenizer = (tokenizer_dir / "tokenizer.json").is_file()  # BPE runs; the byte tokenizer has none
    if run.uses_transformers:
        import torch

        from .hf.export import save_folder

        if args.arch != "auto":
            raise ValueError(f"--arch {args.arch}: this run trained transformers' own "
                             f"{run.model.model_type} class, which is written as it is; drop --arch")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        out = save_folder(model, args.out, tokenizer_dir=str(tokenizer_dir), overwrite=args.overwrite,
                          dtype=dtypes.get(args.dtype), inputs=(args.run_dir,))
        print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
        return 0
    out = export_hf(model, args.out, format=args.arch, dtype=args.dtype,
                    tokenizer_dir=tokenizer_dir if has_hf_tokenizer else None, overwrite=args.overwrite,
                    inputs=[args.run_dir])
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if not has_hf_tokenizer:
        print("note: this run uses moekit's byte tokenizer (ids = UTF-8 bytes, 256 = end of text); "
              "transformers has no equivalent file, so none was written")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.harness import bench_env
    from .bench.layer import resolve_configs, run_layer_benchmark

    if args.what == "hf":
        return _bench_hf(args)
    if args.families:
        raise ValueError("--families applies to `moekit bench hf`; `moekit bench layer|model|decode` compare moekit's "
                         "own layers and presets")
    if args.what in ("model", "decode"):
        return _bench_end_to_end(args)
    if args.presets:
        raise ValueError("--presets applies to `moekit bench model|decode`; `moekit bench layer` takes --configs")
    configs = [name for name in args.configs.split(",") if name.strip()] if args.configs else None
    resolve_configs(configs)  # a bad name or a missing GPU fails before any work
    bench_env(args.device)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    run_layer_benchmark(configs=configs, tokens=tokens, device=args.device, threads=args.threads,
                        repeats=args.repeats if args.repeats is not None else 5, quick=args.quick,
                        json_path=args.json, small=not args.no_small)
    return 0


def _bench_end_to_end(args: argparse.Namespace) -> int:
    """`moekit bench model|decode`: whole presets against transformers (training step, or generation)."""
    from .bench.decode import run_decode_benchmark
    from .bench.harness import bench_env
    from .bench.model import resolve_runs, run_model_benchmark

    layer_only = [flag for flag, given in (("--configs", args.configs), ("--tokens", args.tokens),
                                           ("--no-small", args.no_small)) if given]
    if layer_only:
        raise ValueError(f"{', '.join(layer_only)} applies only to `moekit bench layer`; `moekit bench {args.what}` "
                         "takes --presets, --device, --threads, --repeats, --quick and --json")
    presets = [name.strip() for name in args.presets.split(",") if name.strip()] if args.presets else None
    bench_env(args.device)  # a missing GPU or a bad preset fails before any work
    resolve_runs(presets)
    runner = run_model_benchmark if args.what == "model" else run_decode_benchmark
    extra = {"repeats": args.repeats} if args.repeats is not None else {}
    runner(presets=presets, device=args.device, threads=args.threads, quick=args.quick, json_path=args.json, **extra)
    return 0


def _bench_hf(args: argparse.Namespace) -> int:
    """`moekit bench hf`: transformers' own MoE models under every experts implementation, moekit's included."""
    from .bench.harness import bench_env
    from .bench.hf import resolve_families, run_hf_benchmark

    others = [flag for flag, given in (("--configs", args.configs), ("--tokens", args.tokens),
                                       ("--no-small", args.no_small), ("--presets", args.presets)) if given]
    if others:
        raise ValueError(f"{', '.join(others)} does not apply to `moekit bench hf`; it takes --families, --device, "
                         "--threads, --repeats, --quick and --json")
    families = args.families.split(",") if args.families else None
    resolve_families(families)  # a bad family name or a missing GPU fails before any work
    bench_env(args.device)
    extra = {"repeats": args.repeats} if args.repeats is not None else {}
    run_hf_benchmark(families=families, device=args.device, threads=args.threads, quick=args.quick,
                     json_path=args.json, **extra)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .train.report import compare_runs

    table, _ = compare_runs([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None)
    print(table)
    if args.out:
        print(f"wrote {Path(args.out) / 'compare.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .train.report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def parse_size(text: str) -> int:
    """Bytes from a size such as ``2GB``, ``500MB``, ``64KB`` or a plain integer (decimal units, as HF uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    value = str(text).strip().upper()
    unit = next((u for u in units if value.endswith(u)), "")
    number, factor = value[: len(value) - len(unit)].strip(), units.get(unit, 1)
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"size {text!r} is not understood; write e.g. 2GB, 500MB or a number of bytes") from None
    if size < 1:
        raise ValueError(f"size {text!r} must be positive")
    return size


def cmd_merge(args: argparse.Namespace) -> int:
    from .extras import require
    from .interop.merge import merge

    require("merge")
    plan = merge(args.config, args.out, dry_run=args.dry_run, device=args.device, overwrite=args.overwrite,
                 for_further_training=args.for_further_training, max_shard_bytes=parse_size(args.max_shard_size),
                 progress=not args.no_progress)
    print(("moekit merge --dry-run: nothing written\n" if args.dry_run else "") + plan.format())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .analysis.prune import prune_experts
    from .extras import require

    require("prune")
    result = prune_experts(args.model, args.out, args.keep, by=args.by, data=args.data, tokens=args.tokens,
                           seed=args.seed)
    print(result.format())
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from .extras import require
    from .interop.upcycle import upcycle

    require("upcycle")
    plan = upcycle(args.model, args.out, args.experts, args.top_k, fine_grained=args.fine_grained,
                   shared_experts=args.shared_experts, noise=args.noise, architecture=args.arch, dtype=args.dtype,
                   seed=args.seed, overwrite=args.overwrite, dry_run=args.dry_run,
                   max_shard_bytes=parse_size(args.max_shard_size), progress=not args.no_progress)
    print(("moekit upcycle --dry-run: nothing written\n" if args.dry_run else "") + plan.format())
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.analyze import analyze, analyze_trace
    from .analysis.report import summary_text
    from .extras import require

    require("analyze")
    source = Path(args.model)
    if source.is_file() and source.suffix == ".safetensors":  # a saved trace: no model needed
        if args.data or args.domains or args.save_trace:
            raise ValueError("a trace already holds its tokens: --data, --domains and --save-trace do not apply")
        result = analyze_trace(source, out=args.out, capacity_factor=args.capacity_factor,
                               permutations=args.permutations, seed=args.seed)
    else:
        result = analyze(source, data=args.data, domains=args.domains, tokens=args.tokens,
                         batch_size=args.batch_size, out=args.out, capacity_factor=args.capacity_factor,
                         save_trace=args.save_trace, block_size=args.block_size, permutations=args.permutations,
                         seed=args.seed, progress=not args.no_progress)
    print(summary_text(result))
    print(f"wrote {Path(args.out) / 'analysis.json'}, {Path(args.out) / 'routing.html'} and figures/")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .extras import require

    require("serve")
    from .serve.server import build_app, run_server

    app = build_app(args.models, moa=args.moa, api_key=args.api_key, max_batch=args.max_batch,
                    max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit, device=args.device,
                    threads=args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"moekit serve: warning: listening on {args.host} without --api-key: anyone who reaches this "
              "address can use the models", file=sys.stderr)
    print(f"moekit serve: serving {', '.join(app.state.backends)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    run_server(app, args.host, args.port)

def cmd_moa(args: argparse.Namespace) -> int:
    from .extras import require

    require("moa")
    from .moa import MoAError, load_config, run_moa_sync

    config = load_config(args.config)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = run_moa_sync(config, args.prompt, stream=not args.no_stream, on_text=show)
    except MoAError as error:
        print(error.report.format_table(), file=sys.stderr)
        if args.report:
            error.report.write(args.report)
        raise ValueError(str(error)) from None
    sys.stdout.write("\n")
    print(result.report.format_table(), file=sys.stderr)
    if args.report:
        print(f"wrote {result.report.write(args.report)}", file=sys.stderr)
    return 0


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """OUT and the options `merge` and `upcycle` share."""
    parser.add_argument("out", help="output directory (written atomically)")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .interop.hf import EXPORT_FORMATS

    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a small MoE language model (default: tiny-mixtral on Shakespeare)")
    train.add_argument("--preset", help=f"preset name (default {DEFAULT_PRESET}); see `moekit presets`")
    train.add_argument("--config", help="a YAML or JSON run config file instead of a preset")
    train.add_argument("--out", help="run directory (default runs/<name>)")
    train.add_argument("--max-steps", type=int, help="override train.max_steps (on --resume only with "
                                                     "--extend-schedule)")
    train.add_argument("--stop-at", type=int, metavar="N",
                       help="stop at step N with a checkpoint, on the planned schedule (resume continues it exactly)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from its newest checkpoint")
    train.add_argument("--extend-schedule", action="store_true",
                       help="with --resume and a larger --max-steps: plan the cosine over the new total from the "
                            "resume step on (the learning rate jumps there; earlier steps keep theirs)")
    train.add_argument("--init-from", metavar="HF_DIR",
                       help="start from a Hugging Face checkpoint folder (moekit merge/upcycle output): its weights, "
                            "config and tokenizer.json (same as --set train.init_from=HF_DIR)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any field, e.g. --set model.moe.num_local_experts=16 (repeatable)")
    train.add_argument("--ep", type=int, metavar="N",
                       help="expert parallelism under torchrun: every N ranks share each layer's experts, the rest is "
                            "data parallel (same as --set train.expert_parallel=N); e.g. torchrun --nproc-per-node 4 "
                            "-m moekit train --ep 2")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing run directory (only a moekit run holding nothing else)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="validation loss, perplexity and expert load of a run")
    ev.add_argument("run_dir")
    ev.add_argument("--batches", type=int, default=16)
    ev.set_defaults(func=cmd_eval)

    info = sub.add_parser("info", help="total/active parameters, FLOPs per token and memory of a model")
    info.add_argument("source", help="a run directory, a run config file, a preset name or an HF model directory")
    info.add_argument("--context", type=int, default=4096, help="context length for attention FLOPs and KV cache")
    info.add_argument("--batch", type=int, default=1, help="batch size for the KV cache")
    info.set_defaults(func=cmd_info)

    exp = sub.add_parser("export", help="write a run as a Hugging Face transformers checkpoint")
    exp.add_argument("run_dir")
    exp.add_argument("out")
    exp.add_argument("--format", default="hf", choices=["hf"], help="output format (hf: transformers directory)")
    exp.add_argument("--arch", default="auto", choices=EXPORT_FORMATS,
                     help="transformers architecture, a family's model_type (auto picks the first that computes the "
                          "model exactly)")
    exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="time an MoE layer, a training step or decoding against transformers")
    bench.add_argument("what", choices=["layer", "model", "decode", "hf"],
                       help="layer: one MoE layer vs transformers and the dense floor; model: a training step and "
                            "a forward of whole presets; decode: greedy generation with a KV cache; hf: "
                            "transformers' own MoE models under every experts implementation, moekit's included")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (fp32) or cuda (bf16)")
    bench.add_argument("--configs", help="layer: comma-separated subset of mixtral,deepseek,dbrx (default all)")
    bench.add_argument("--tokens", help="layer: tokens per batch for the main rows, comma-separated (default 4096)")
    bench.add_argument("--presets", help="model/decode: comma-separated MoE presets (default "
                                         "tiny-mixtral,tiny-deepseek)")
    bench.add_argument("--families", help="hf: comma-separated transformers model_types (default "
                                          "qwen3_moe,olmoe,gpt_oss; also mixtral, qwen2_moe, deepseek_v3, "
                                          "granitemoe, phimoe)")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=None,
                       help="timed interleaved rounds (default: layer 5, model 10, decode 5, hf 5)")
    bench.add_argument("--quick", action="store_true",
                       help="a smoke run: at most 2 rounds (model/decode/hf: also small shapes)")
    bench.add_argument("--no-small", action="store_true", help="layer: skip the 16-token forward-only rows")
    bench.add_argument("--json", metavar="PATH", help="also write every result as JSON")
    bench.set_defaults(func=cmd_bench)

    cmp = sub.add_parser("compare", help="side-by-side table and overlaid plots of several runs")
    cmp.add_argument("run_dirs", nargs="+")
    cmp.add_argument("--out", help="write compare.md and compare.png into this directory")
    cmp.set_defaults(func=cmd_compare)

    rep = sub.add_parser("report", help="(re)write a run's report.md and plots")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    mrg = sub.add_parser("merge", help="build an MoE from dense HF models with a mergekit-moe YAML config")
    mrg.add_argument("config", help="YAML config (mergekit-moe keys: base_model, experts, gate_mode, ...)")
    _add_output_options(mrg)
    mrg.add_argument("--device", default="cpu", help="where router initialisation runs the base model (cpu, cuda)")
    mrg.add_argument("--for-further-training", action="store_true",
                     help="accept experts that all share one source model or the same prompts (train afterwards)")
    mrg.set_defaults(func=cmd_merge)

    up = sub.add_parser("upcycle", help="sparse upcycling: an MoE whose experts copy a dense model's FFN")
    up.add_argument("model", help="dense HF model directory (safetensors) or .gguf file")
    _add_output_options(up)
    up.add_argument("--experts", type=int, default=8, help="copies of the FFN (default 8)")
    up.add_argument("--top-k", type=int, default=2, help="copies used per token (default 2)")
    up.add_argument("--fine-grained", type=int, default=1, metavar="M",
                    help="split each copy into M experts of width I/M, top-k x M active (default 1)")
    up.add_argument("--shared-experts", type=int, default=0, metavar="N", help="shared experts (default 0)")
    up.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                    help="relative std of noise on routed experts (default 0: exact copies)")
    up.add_argument("--arch", default=None, choices=["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"],
                    help="output layout (default: by the model's family, as merge picks)")
    up.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    up.add_argument("--seed", type=int, default=0)
    up.set_defaults(func=cmd_upcycle)

    ana = sub.add_parser("analyze", help="what the routers do: balance, drops, specialisation, figures, routing.html")
    ana.add_argument("model", help="a moekit run directory, an HF MoE folder, or a trace.safetensors to re-analyse")
    ana.add_argument("--data", help="a text file to route (default: the run's validation split)")
    ana.add_argument("--domains", help="a folder with one text file (or folder of files) per domain")
    ana.add_argument("--tokens", type=int, default=100_000, help="tokens to route, split over domains "
                                                                "(default 100000)")
    ana.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    ana.add_argument("--block-size", type=int, help="window length (default: the run's block size; 256 for HF)")
    ana.add_argument("--out", default="analysis", help="output folder (default ./analysis)")
    ana.add_argument("--capacity-factor", type=float, default=1.0,
                     help="capacity the drop statistics assume, x the ideal load (default 1.0)")
    ana.add_argument("--save-trace", action="store_true", help="also write trace.safetensors (tokens x layers x k)")
    ana.add_argument("--permutations", type=int, default=100, help="shuffles for the domain-information baseline")
    ana.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    ana.add_argument("--no-progress", action="store_true", help="no progress bar")
    ana.set_defaults(func=cmd_analyze)
    prn = sub.add_parser("prune", help="remove the least used experts of every MoE layer (run or HF folder)")
    prn.add_argument("model", help="a moekit run directory or a Hugging Face checkpoint folder of a native family")
    prn.add_argument("out", help="output directory, in the model's format (written atomically)")
    prn.add_argument("--keep", type=int, required=True, metavar="N", help="experts to keep per MoE layer")
    prn.add_argument("--by", default="frequency", choices=["frequency", "saliency", "random"],
                     help="frequency: tokens routed; saliency: REAP (gate weight x expert output norm); random")
    prn.add_argument("--data", metavar="PATH", help="text file to route (default for a run: its validation split; "
                                                    "required for an HF folder)")
    prn.add_argument("--tokens", type=int, default=65536, help="tokens routed at most (default 65536)")
    prn.add_argument("--seed", type=int, default=0, help="seed of --by random")
    prn.set_defaults(func=cmd_prune)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for runs, HF folders and GGUF files")
    srv.add_argument("models", nargs="*", metavar="MODEL",
                     help="moekit run directory, Hugging Face model folder or .gguf file; served under its folder "
                          "(or file) name")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    srv.add_argument("--moa", action="append", metavar="CONFIG.yaml",
                     help="also serve a Mixture-of-Agents config as the virtual model moa:NAME (repeatable)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (default 8)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting beyond those; more are refused with 503 (default 64)")
    srv.add_argument("--max-tokens-limit", type=int, default=1024,
                     help="answer length of a request without max_tokens (default 1024; the context caps it too)")
    srv.add_argument("--device", default="cpu", help="torch device of the local models (default cpu)")
    srv.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models on busy CPUs)")
    srv.set_defaults(func=cmd_serve)

    moa = sub.add_parser("moa", help="Mixture-of-Agents: proposer layers and an aggregator over OpenAI-compatible "
                                     "endpoints")
    moa.add_argument("config", help="the mixture's YAML config (see examples/moa/)")
    moa.add_argument("--prompt", required=True, help="the question to answer")
    moa.add_argument("--report", metavar="PATH", help="write the report of every call as JSON")
    moa.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    moa.set_defaults(func=cmd_moa)

    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=lambda args: print("\n".join(preset_names())) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .train.errors import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, ImportError, TrainingError) as error:  # OSError: files, disks, permissions
        print(f"moekit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
