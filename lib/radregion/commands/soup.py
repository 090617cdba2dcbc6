"""`radregion soup`: one backbone whose weights are the mean of fine-tuned bundles' (`radregion.soup`)."""

from __future__ import annotations


def register(subparsers):
    parser = subparsers.add_parser(
        "soup",
        help="average the weights of bundles fine-tuned from one start (a model soup)",
        description="Average the backbone weights of bundles fine-tuned from the same start (e.g. `fit-head "
        "--fine-tune` at several seeds): a uniform model soup (Wortsman et al., ICML 2022), one model's inference "
        "cost. The output has no head: fit one with `radregion fit-head --model OUTPUT`.",
    )
    parser.add_argument("--model", action="append", required=True, metavar="BUNDLE", help="a member; repeat")
    parser.add_argument(
        "--recalibrate",
        metavar="CSV",
        help="recompute the batch norms' running statistics on this labels CSV's images (cleaned, not augmented; "
        "the labels are not used) instead of averaging the members'",
    )
    parser.add_argument("--images-root", metavar="DIR", help="folder --recalibrate's paths are relative to")
    parser.add_argument("--output", required=True, metavar="BUNDLE")
    return parser


def run(args) -> int:
    import shlex

    from radregion.bundle import load_bundle, provenance, save_bundle
    from radregion.soup import average_backbones, check_members, recalibrate_batch_norm, start_of

    members = [load_bundle(path) for path in args.model]
    check_members(members)
    state = average_backbones(members)
    first = members[0]
    if args.recalibrate:
        from radregion.datasets import read_labels_csv
        from radregion.features import load_clean_images

        net = first.backbone()
        net.load_state_dict(state, strict=True)
        items = read_labels_csv(args.recalibrate, args.images_root, taxonomy=first.taxonomy())
        recalibrate_batch_norm(net, load_clean_images([item.path for item in items], first.settings))
        state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    meta = {key: first.meta[key] for key in ("architecture", "cleaning", "taxonomy") if key in first.meta}
    licences = list(dict.fromkeys(member.meta.get("licence", "unknown") for member in members))
    meta["licence"] = " ".join(licences)  # each member's terms, once
    meta["training"] = provenance(
        [(member.meta.get("training") or {}).get("data") for member in members],
        shlex.join(command_parts(args)),
        stage="soup",
        members=[{"path": str(m.path), "version": m.version} for m in members],
        batch_norm="recalibrated on " + args.recalibrate if args.recalibrate else "averaged",
        backbone=start_of(first),
    )
    save_bundle(args.output, state, meta=meta, half_backbone=first.meta.get("weights_dtype") == "float16")
    print(f"soup of {len(members)} bundles -> {args.output} (no head yet: radregion fit-head --model {args.output})")
    return 0


def command_parts(args) -> list[str]:
    """The command that makes this soup again (recorded in bundle.json)."""
    parts = ["radregion", "soup"]
    for path in args.model:
        parts += ["--model", path]
    parts += ["--recalibrate", args.recalibrate] if args.recalibrate else []
    parts += ["--images-root", args.images_root] if args.images_root else []
    return parts + ["--output", args.output]
