"""`vramplan inference`: how vLLM will serve a model, by its own start-up accounting (planner/serving.py).

Exit codes as `check`: 0 serves at least one request of max_model_len, 1 does not, 2 bad input."""

from __future__ import annotations

from app.cli.output import GIB, parse_options, write, write_json


def cmd_inference(args) -> int:
    from planner.serving import ServingOptions, plan_serving_request, serving_searches

    options = parse_options(args, ServingOptions)
    if args.find == "gpu":
        return _find_gpu(args, options)
    plan = plan_serving_request(args.model, options)
    data = plan.to_dict()
    if args.concurrency:
        data["search"] = serving_searches(plan, concurrency=args.concurrency, request_tokens=options.request_tokens)
    if args.export == "vllm":
        from planner.serving import vllm_serve_text

        write(vllm_serve_text(plan).rstrip("\n"))
        return 0 if plan.fits else 1
    if args.json:
        write_json(data)
        return 0 if plan.fits else 1
    write(f"{plan.verdict}: {plan.model_name} on {plan.gpu_count} x {plan.gpu_name} with vLLM {options.engine_version}: "
          f"{plan.kv_cache_tokens:,} KV cache tokens ({plan.kv_cache_bytes / GIB:.2f} GiB), "
          f"maximum concurrency {plan.max_concurrency:.2f}x at {plan.max_model_len:,} tokens"
          + (f", {plan.concurrency_at_request_tokens:.2f}x at {options.request_tokens:,}" if plan.concurrency_at_request_tokens is not None else ""))
    for c in data["components"]:
        write(f"  {c['name']:<22} {c['bytes'] / GIB:>9.3f} GiB  {c['note']}")
    for reason in plan.reasons:
        write(f"  why: {reason}")
    for note in plan.notes:
        write(f"  assumed: {note}")
    if "search" in data:
        s = data["search"]
        util = s["gpu_memory_utilization_needed"]
        write(f"  {s['concurrency']} requests of {s['request_tokens']:,} tokens: "
              + (f"--gpu-memory-utilization {util}" if util else "more than this GPU holds")
              + f"; longest --max-model-len at that concurrency: {s['longest_max_model_len']:,}")
    return 0 if plan.fits else 1


def _find_gpu(args, options) -> int:
    from planner.serving import find_serving_gpus

    rows = find_serving_gpus(args.model, options, concurrency=args.concurrency or 1, request_tokens=options.request_tokens)
    if args.json:
        write_json({"concurrency": args.concurrency or 1, "request_tokens": options.request_tokens, "gpus": rows})
        return 0 if rows else 1
    if not rows:
        write(f"no catalog GPU serves it at up to 8 ranks (--gpu-memory-utilization {options.gpu_memory_utilization})")
        return 1
    for r in rows:
        price = f"${r['price_per_hour_usd']:.2f}/h" if r["price_per_hour_usd"] is not None else "price unknown"
        write(f"{r['tensor_parallel_size']} x {r['gpu']:<28} {price:>14}  {r['kv_cache_tokens']:>10,} KV tokens  "
              f"{r['max_concurrency']:.2f}x at max_model_len  needs --gpu-memory-utilization {r['gpu_memory_utilization_needed']}")
    return 0


def add_commands(sub) -> None:
    from app.cli.output import option_flags
    from planner.serving import ServingOptions

    p = sub.add_parser("inference", help="serving with vLLM: KV cache tokens and concurrency; exit 0 serves, 1 does not, 2 bad input")
    p.add_argument("model", help="catalog id, a directory or a config.json (as for plan)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--find", choices=("gpu",), default=None, help="list the catalog GPUs, each at the smallest tensor-parallel size that serves --concurrency requests, cheapest first")
    p.add_argument("--export", choices=("vllm",), default=None, help="print the `vllm serve` command line of this plan")
    p.add_argument("--concurrency", type=int, default=None, help="also search the utilization and the longest max_model_len for this many concurrent requests")
    option_flags(p, ServingOptions, "serving options (vLLM's flag names; JSON fields use underscores)")
    p.set_defaults(func=cmd_inference)
