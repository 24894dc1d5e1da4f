"""The ``midpo`` command line (interfaces.md). Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from midpo.config import ConfigError, MidpoConfig

log = logging.getLogger("midpo")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="tiny", help="profile name (tiny, tiny-ci, smollm2, alpaca7b) or a .yaml file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. data.eval_fraction=0.2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midpo", description="MidPO: safe and helpful alignment with a mixture of two preference experts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a profile")
    _profile_args(run)
    run.add_argument("--report-dir", type=Path, help="where metrics.json and the report go (default under $MIDPO_HOME/reports)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved stage plan and which stages are cache hits")
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser("compare", help="every method on the same data and base over N seeds (docs/compare.md)")
    _profile_args(compare)
    compare.add_argument("--methods", help="comma-separated method names (default: all of base, safety-expert, helpfulness-expert, midpo, merge-half, dpo-helpful, dpo-harmless, dpo-mix, safedpo, bfpo, modpo)")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3): the value is the mean, x_std the spread")
    compare.add_argument("--report-dir", type=Path, help="where metrics.json, report.md and pareto.png go (default under $MIDPO_HOME/reports)")
    compare.set_defaults(func=cmd_compare)

    data = sub.add_parser("data", help="validate or prepare preference data").add_subparsers(dest="data_command", required=True)
    validate = data.add_parser("validate", help="check a file without training")
    validate.add_argument("path", help="a path, file://, s3:// URI or builtin:NAME")
    validate.add_argument("--format", default="auto", choices=["auto", "pku", "hh", "alpaca-eval", "prompts", "completions"])
    validate.add_argument("--json", action="store_true", help="print one JSON object")
    validate.set_defaults(func=cmd_validate)
    prep = data.add_parser("prepare", help="canonical dataset + subsets + splits under the artifact root")
    _profile_args(prep)
    prep.add_argument("--source", action="append", default=[], metavar="URI", help="use these sources instead of the profile's (format auto)")
    prep.add_argument("--out", help="artifact root (file://... or s3://bucket/prefix); default $MIDPO_ARTIFACT_ROOT")
    prep.set_defaults(func=cmd_prepare)

    ev = sub.add_parser("eval", help="generate with one model and judge it on eval sets")
    _profile_args(ev)
    ev.add_argument("--model", required=True, help="a model folder or URI (file://, s3://, the artifact root), a package alias, or models:/midpo@champion")
    ev.add_argument("--name", help="the method name in metrics.json (default: the model folder's name)")
    ev.add_argument("--prompts", action="append", default=[], metavar="FILE", help="a prompt file (csv/jsonl/txt) instead of the profile's eval sets")
    ev.add_argument("--kind", action="append", default=[], choices=["harmful", "borderline", "benign"], help="the kind of each --prompts file, in order")
    ev.add_argument("--report-dir", type=Path, help="where metrics.json and report.md go (default under $MIDPO_HOME/reports)")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate with any packaged model, the MoE included (docs/moe.md)")
    gen.add_argument("--model", required=True, help="a MoE folder, a model folder, a file:// or s3:// URI, or models:/NAME@ALIAS (MLflow)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    source.add_argument("--file", metavar="FILE", help="a prompt file (txt: one per line; csv/jsonl with a prompt column)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, help="seed torch's generator (reproducible sampling)")
    gen.add_argument("--jsonl", action="store_true", help="print one JSON object {prompt, response} per line")
    gen.set_defaults(func=cmd_generate)

    promote = sub.add_parser("promote", help="the promotion gate: candidate vs champion on the gate set; exit 0 promoted, 3 refused (docs/lifecycle.md)")
    _profile_args(promote)
    which = promote.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="the candidate version (default: the registry alias `challenger`)")
    which.add_argument("--run-id", help="the candidate is the version this MLflow run (a pipeline run or its register stage) registered")
    which.add_argument("--rollback", action="store_true", help="point `champion` back at the previous champion")
    promote.add_argument("--force", action="store_true", help="promote even when the gate refuses (recorded as forced)")
    promote.set_defaults(func=cmd_promote)

    bench = sub.add_parser("bench", help="benchmarks against a stock baseline (docs/benchmarks.md)").add_subparsers(dest="bench_command", required=True)
    experts = bench.add_parser("experts", help="SPE-DPO expert training vs stock TRL DPOTrainer")
    _profile_args(experts)
    experts.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    experts.add_argument("--max-pairs", type=int, help="a seeded sample of N pairs per subset (quick runs)")
    experts.set_defaults(func=cmd_bench_experts)
    moe = bench.add_parser("moe", help="MoE generation (two experts + gates) vs the base with one merged adapter")
    _profile_args(moe)
    moe.add_argument("--json", dest="json_path", type=Path, metavar="PATH", help="also write every figure to this JSON file")
    moe.add_argument("--batch", type=int, help="prompts per generation (default: tiny 32, smollm2 8, others 8)")
    moe.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default: tiny 48, smollm2 64, others 16)")
    moe.add_argument("--rounds", type=int, help="timed alternating rounds (default: tiny 20, others 5)")
    moe.add_argument("--experts", choices=["pipeline", "random"], help="trained experts from the pipeline, or random LoRAs (default by profile)")
    moe.add_argument("--no-prototypes", dest="prototypes", action="store_false", help="skip the fused-layer prototypes")
    moe.add_argument("--device", help="cpu or cuda (default cuda when available)")
    moe.add_argument("--threads", type=int, help="torch threads (default: the profile's run.torch_threads, else 1)")
    moe.set_defaults(func=cmd_bench_moe)
    pipeline = bench.add_parser("pipeline", help="orchestration overhead of a first run and the cost of a rerun (docs/benchmarks.md)")
    _profile_args(pipeline)
    pipeline.add_argument("--json", dest="json_path", type=Path, metavar="PATH", help="also write every figure to this JSON file")
    pipeline.set_defaults(func=cmd_bench_pipeline)

    retrain = sub.add_parser("retrain", help="one poll of a watched prefix: ingest new preference files, retrain when the dataset changed (docs/lifecycle.md)")
    _profile_args(retrain)
    retrain.add_argument("--prefix", required=True, help="the watched prefix: s3://bucket/prefix/, a folder or file://")
    retrain.add_argument("--force", action="store_true", help="run the pipeline even when the dataset version did not change")
    retrain.add_argument("--report-dir", type=Path, help="where metrics.json and the report go when it runs")
    retrain.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    retrain.set_defaults(func=cmd_retrain)

    from midpo import retention  # `midpo prune`: the retention policy (docs/lifecycle.md)

    prune = sub.add_parser("prune", help="the retention policy: delete old model versions and artifacts, never an aliased version or what it references (docs/lifecycle.md)")
    prune.add_argument("--keep-versions", type=int, default=retention.DEFAULT_KEEP_VERSIONS, metavar="N", help=f"keep the newest N versions of each pruned model (default {retention.DEFAULT_KEEP_VERSIONS})")
    prune.add_argument("--older-than", type=float, default=retention.DEFAULT_OLDER_THAN_DAYS, metavar="DAYS", help=f"delete only what is older than DAYS (default {retention.DEFAULT_OLDER_THAN_DAYS:g})")
    prune.add_argument("--keep-artifacts", type=int, default=retention.DEFAULT_KEEP_ARTIFACTS, metavar="N", help=f"keep the newest N versions of each artifact family (default {retention.DEFAULT_KEEP_ARTIFACTS})")
    prune.add_argument("--model", action="append", dest="models", metavar="NAME", help="the registered model to prune (repeatable; default midpo)")
    prune.add_argument("--dry-run", action="store_true", help="print the plan (what would be deleted, bytes freed); delete nothing")
    prune.add_argument("--yes", action="store_true", help="delete without asking")
    prune.add_argument("--keep-logged-models", action="store_true", help="do not mark the logged models of deleted versions deleted")
    prune.add_argument("--json", action="store_true", help="print the plan (and what was deleted) as one JSON object")
    prune.add_argument("--no-registry-check", dest="check_registry", action="store_false", help="prune even when the registry has no such model or its versions reference another artifact root")
    prune.set_defaults(func=cmd_prune)

    config = sub.add_parser("config", help="inspect configuration").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved, validated config as YAML")
    _profile_args(show)
    show.set_defaults(func=cmd_config_show)

    stack = sub.add_parser("stack", help="a local Prefect server + worker, MLflow server and S3 endpoint (docs/stack.md)").add_subparsers(dest="stack_command", required=True)
    stack_up = stack.add_parser("up", help="start the local stack (state and logs in $MIDPO_HOME/stack)")
    stack_up.add_argument("--gpu-slots", type=int, default=2, help="the Prefect concurrency limit `gpu`: stages that run a model at once (default 2)")
    stack_up.set_defaults(func=cmd_stack)
    stack.add_parser("down", help="stop every process of the local stack").set_defaults(func=cmd_stack)
    stack_status = stack.add_parser("status", help="health of each service (exit 0 when all are up)")
    stack_status.add_argument("--env", action="store_true", help='print only `export NAME=value` lines, for eval "$(midpo stack status --env)"')
    stack_status.set_defaults(func=cmd_stack)
    return parser


def portable_profile(profile: str) -> str:
    """A profile name as it is, a profile file as an absolute path: a flow run may start in another directory."""
    return str(Path(profile).resolve()) if Path(profile).is_file() else profile


def run_flow(cfg: MidpoConfig, profile: str, overrides: list[str], report_dir: Path) -> dict[str, Any]:
    """The ``midpo`` flow, as ``prefect deployment run midpo/full-pipeline`` runs it, in this process."""
    from midpo_flows.api import prefect_api

    with prefect_api(cfg) as slots:
        from midpo_flows.pipeline import midpo

        log.info("stages that run a model: %d at once (Prefect concurrency limit `gpu`)", slots)
        return midpo(profile=profile, overrides=overrides, report_dir=str(report_dir))


def cmd_run(args: argparse.Namespace) -> int:
    from midpo.config import load_config
    from midpo.launch import launches, processes
    from midpo.pipeline import default_report_dir, run_pipeline, stages_for

    cfg = load_config(args.profile, args.overrides)
    if args.dry_run:
        run, report = run_pipeline(cfg, dry_run=True).run_section(), None
    else:
        profile = portable_profile(args.profile)
        result = run_flow(cfg, profile, args.overrides, args.report_dir or default_report_dir(cfg.profile))
        run, report = result["run"], result["report_dir"]
    budgets = cfg.run.stage_budgets
    for stage in stages_for(cfg):
        status = "cache hit" if stage.name in run["cache_hits"] else ("would run" if args.dry_run else "ran")
        line = f"{stage.name:18s} {status:10s}"
        if launches(cfg, stage):
            line += f"  on {processes(cfg.run.launch)} processes ({cfg.run.launch.config_file})"
        if not args.dry_run:
            seconds, budget = run["stage_seconds"][stage.name], budgets.get(stage.name)
            over = budget is not None and seconds > budget
            line += f" {seconds:7.1f} s" + (f"  (budget {budget:.0f} s{', OVER' if over else ''})" if budget is not None else "")
        print(line)
    if not args.dry_run:
        total, wall = cfg.run.budget, run["wall_seconds"]
        over = total is not None and wall > total
        print(f"{'total':18s} {'':10s} {wall:7.1f} s" + (f"  (budget {total:.0f} s{', OVER' if over else ''})" if total is not None else ""))
    if report is not None:
        print(f"report: {Path(report) / 'report.md'}  (metrics.json, plots beside it)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from midpo.compare import run_compare
    from midpo.config import load_config
    from midpo.pipeline import default_report_dir

    cfg = load_config(args.profile, args.overrides)
    methods = args.methods.split(",") if args.methods is not None else None
    report_dir = args.report_dir or default_report_dir(f"compare-{cfg.profile}")
    metrics = run_compare(cfg, methods, args.seeds, report_dir)
    costs = metrics["costs"]
    for method in metrics["run"]["methods"]:
        c = costs.get(method, {})
        print(f"{method:20s} train {c.get('train_seconds', 0.0):8.1f}s  params {c.get('trainable_params', 0.0):>10,.0f}  pairs seen {c.get('pairs_seen', 0.0):>8,.0f}")
    print(f"shared stages: {costs['shared']['total_seconds']:.1f}s ({', '.join(costs['shared']['seconds'])}), counted once")
    print(f"report: {report_dir}  (metrics.json, report.md, pareto.png)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from midpo.data.validate import run_validate

    return run_validate(args.path, args.format, args.json)


def cmd_prepare(args: argparse.Namespace) -> int:
    from midpo.config import SourceConfig, load_config
    from midpo.pipeline import run_pipeline

    cfg = load_config(args.profile, args.overrides)
    if args.source:
        cfg.data.sources = [SourceConfig(uri=u) for u in args.source]
    if args.out:
        os.environ["MIDPO_ARTIFACT_ROOT"] = args.out
    summary = run_pipeline(cfg, until="data", report_dir=None)
    dataset = summary.outputs["dataset"]
    if "data" in summary.cache_hits:
        print(f"dataset {dataset.version} already exists at {dataset.uri}: nothing to do")
    else:
        for name, value in summary.stage_metrics["data"].items():
            print(f"{name:32s} {value:8.0f}")
        print(f"written to {dataset.uri}")
    print(f"dataset_version={dataset.version}")
    return 0


def model_folder(ref: str) -> Path:
    """A model reference as a local folder: an artifact URI, a path or file:// URI, s3://, a package alias or
    hub id, or ``models:/name@alias`` (the MoE folder packaged in that registered version)."""
    from midpo.models.provision import resolve_model
    from midpo.storage import ArtifactStore, NotFound, local_copy

    if ref.startswith("models:/"):
        import mlflow
        import yaml

        from midpo.moe.serving import ARTIFACT
        from midpo.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        root = Path(mlflow.artifacts.download_artifacts(ref))
        flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
        if ARTIFACT not in flavor.get("artifacts", {}):
            raise ConfigError(f"{ref} is not a packaged midpo MoE (no {ARTIFACT!r} artifact in its MLmodel)")
        return root / flavor["artifacts"][ARTIFACT]["path"]
    store = ArtifactStore()
    if ref.startswith(store.root + "/"):
        return store.fetch(store.key_of(ref))
    try:  # a local path or file:// as it is (a MoE folder has no config.json at its top)
        return local_copy(ref) if not ref.startswith("s3://") else resolve_model(ref)
    except NotFound:
        return resolve_model(ref)  # hub ids, package aliases (smollm2), or its clear error


def cmd_eval(args: argparse.Namespace) -> int:
    """One model on the profile's eval sets (or prompt files), judged by the profile's judges."""
    from midpo.config import load_config
    from midpo.eval.evaluate import evaluate_model, prompt_file_set
    from midpo.eval.report import write_report
    from midpo.eval.sets import build_eval_sets
    from midpo.models.load import load_model
    from midpo.pipeline import apply_runtime, default_report_dir, run_pipeline, stages_for
    from midpo.stages import judges_for

    cfg = load_config(args.profile, args.overrides)
    apply_runtime(cfg.run)
    if cfg.eval is None:
        raise ConfigError(f"profile {cfg.profile} has no eval section")
    if len(args.kind) != len(args.prompts):
        raise ConfigError("give one --kind per --prompts file")
    folder = model_folder(args.model)  # a bad reference fails before anything is built
    refs = run_pipeline(cfg, until=[s.name for s in stages_for(cfg) if s.name in ("data", "judges", "refusal")]).outputs  # hits once built
    sets = [prompt_file_set(path, kind) for path, kind in zip(args.prompts, args.kind)] or build_eval_sets(cfg.eval.sets, refs)
    model, tokenizer, template = load_model(folder)
    metrics, _ = evaluate_model(model, tokenizer, template, sets, cfg.eval, judges_for(refs))
    report_dir = args.report_dir or default_report_dir(f"eval-{cfg.profile}")
    md = write_report(report_dir, {args.name or folder.name: metrics})
    print(f"report: {md}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """One generation per prompt from a MoE folder, a plain model, or a registered MLflow model."""
    import json

    if args.file:
        from midpo.data.readers import read_source

        records = read_source(args.file, "prompts").records
        prompts = [r.prompt for r in records]
    else:
        prompts = list(args.prompt)
    if not prompts:
        raise ConfigError(f"{args.file}: no prompts")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    params = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "top_p": args.top_p}
    if args.model.startswith("models:/"):  # through the registered pyfunc, exactly as a serving client
        import mlflow

        from midpo.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        responses = list(mlflow.pyfunc.load_model(args.model).predict(prompts, params=params))
    else:
        from midpo.moe.package import generate, is_moe_folder, load_moe

        folder = model_folder(args.model)
        if is_moe_folder(folder):
            from midpo.moe.package import MoEPackageError

            try:
                model, tokenizer = load_moe(folder)
            except MoEPackageError as e:  # a corrupted or unknown package: say which file, no traceback
                print(f"error: {e}", file=sys.stderr)
                return 1
            responses = generate(model, tokenizer, prompts, **params)
        elif (folder / "adapter_config.json").is_file():
            raise ConfigError(f"{args.model} is a LoRA adapter, not a model: package it with its base (a MoE folder or a merged model)")
        else:
            from midpo.models.load import load_model
            from midpo.moe.package import TEMPLATE_KEY

            model, tokenizer, template = load_model(folder)
            tokenizer.init_kwargs[TEMPLATE_KEY] = template.family  # the family load_model chose (midpo_base.json first)
            responses = generate(model, tokenizer, prompts, **params)
    for prompt, response in zip(prompts, responses, strict=True):
        print(json.dumps({"prompt": prompt, "response": response}) if args.jsonl else response)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """The gate's decision table and decision; exit 0 promoted (or already champion), 3 refused, 1 errors."""
    from midpo.config import load_config
    from midpo.promote import PromotionError, check_request, promote, rollback

    cfg = load_config(args.profile, args.overrides)
    try:
        check_request(args.version, args.run_id, args.force, args.rollback)
        decision = rollback(cfg) if args.rollback else promote(cfg, version=args.version, run_id=args.run_id, force=args.force)
    except PromotionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(decision.report())
    return decision.exit_code


def cmd_prune(args: argparse.Namespace) -> int:
    """The retention plan, then its deletions once confirmed; 0 done (or dry run), 1 refused (no confirmation,
    registry mismatch, an unreadable manifest) or a deletion failed. Not beside `midpo promote` (docs/lifecycle.md)."""
    import json

    from midpo.retention import DEFAULT_MODELS, RetentionError, apply, human_bytes, make_plan

    try:
        plan = make_plan(
            models=args.models or list(DEFAULT_MODELS), keep_versions=args.keep_versions, older_than_days=args.older_than,
            keep_artifacts=args.keep_artifacts, check_registry=args.check_registry,
        )  # fmt: skip
    except (RetentionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    doc = plan.to_dict()
    if not args.json:
        print(plan.format(verbose=args.verbose))
    if args.dry_run or not plan.deletions():
        if args.json:
            print(json.dumps({**doc, "dry_run": args.dry_run, "deleted": []}))
        else:
            print("dry run: nothing deleted" if args.dry_run else "nothing to delete")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("error: nothing deleted: confirm with --yes (or look first with --dry-run)", file=sys.stderr)
            return 1
        answer = input(f"delete {len(plan.deletions())} item(s), {human_bytes(plan.bytes_freed)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    try:
        out = apply(plan, delete_logged_models=not args.keep_logged_models)
    except RetentionError as e:  # the artifacts' re-check could not read a manifest: none deleted
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**doc, "dry_run": False, "deleted": [i.to_dict() for i in out.deleted],
                          "skipped": [{**i.to_dict(), "why": w} for i, w in out.skipped],
                          "failed": [{**i.to_dict(), "error": e} for i, e in out.failed]}))  # fmt: skip
    else:
        print(f"deleted {len(out.deleted)} item(s), freed {human_bytes(out.bytes_freed)}; skipped {len(out.skipped)}, failed {len(out.failed)}")
    return 1 if out.failed else 0


def cmd_bench_experts(args: argparse.Namespace) -> int:
    from midpo_bench.experts import format_report, run

    print(format_report(run(args.profile, args.overrides, args.json, args.max_pairs)))
    return 0


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from midpo_bench.moe import format_report, run_args

    print(format_report(run_args(args)))
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from midpo_bench.pipeline import format_report, run

    print(format_report(run(args.profile, args.overrides, args.json_path)))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """One poll of the ``midpo-retrain`` flow in this process, as ``prefect deployment run midpo-retrain/retrain`` runs it."""
    import json

    from midpo_flows.api import prefect_api

    from midpo.config import load_config
    from midpo.retrain import format_summary

    profile = portable_profile(args.profile)
    with prefect_api(load_config(args.profile, args.overrides)):
        from midpo_flows.retrain import midpo_retrain

        out = midpo_retrain(prefix=args.prefix, profile=profile, overrides=args.overrides, force=args.force, report_dir=str(args.report_dir) if args.report_dir else None)
    print(json.dumps(out) if args.json else format_summary(out))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from midpo.config import load_config

    print(load_config(args.profile, args.overrides).to_yaml(), end="")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from midpo import stack

    try:
        if args.stack_command == "up":
            return stack.up(args.gpu_slots)
        if args.stack_command == "down":
            return stack.down()
        return stack.status(env=args.env)
    except stack.StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "botocore", "httpx", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from midpo.storage import use_standard_s3_retries

    use_standard_s3_retries()
    from midpo.data.prepare import DataError
    from midpo.data.readers import Unreadable
    from midpo.storage import NotFound

    try:
        return args.func(args)
    except (ConfigError, DataError, NotFound, Unreadable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished artifacts are kept; a rerun resumes from them and from the last checkpoints", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
