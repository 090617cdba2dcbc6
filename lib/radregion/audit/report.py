"""index.html: the self-contained offline audit report (inline PNGs, CSS and JS; no external URL)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from radregion.atomic import atomic_write
from radregion.audit.gradcam import overlay
from radregion.audit.writer import suspicion_order

TEMPLATE = Path(__file__).with_name("report.html")
THUMB = 112


def png_uri(array: np.ndarray, size: int | None = THUMB) -> str:
    image = Image.fromarray(np.asarray(array))
    if size:
        image = image.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tsne_coordinates(features: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """2-D t-SNE of standardised features (None for fewer than 5 images)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if features is None or len(features) < 5:
        return None
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    perplexity = float(min(30, (len(x) - 1) / 3))
    with threadpool_limits(1):  # small problem: OpenMP threads only contend (25x slower on a busy machine)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def tsne_plot(xy: np.ndarray, result) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suggested = result.suggested_index
    colour_of = np.where(result.given_index >= 0, result.given_index, suggested)
    present = np.unique(colour_of)
    cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    for n, k in enumerate(present):
        sel = colour_of == k
        ax.scatter(
            xy[sel, 0], xy[sel, 1], s=12, color=cmap(n % cmap.N), label=result.regions[k], alpha=0.8, linewidths=0
        )
    for mask, style in (
        (result.is_issue, dict(s=70, facecolors="none", edgecolors="black", linewidths=1.3, label="suspected error")),
        (result.out_of_domain, dict(s=40, marker="x", color="dimgray", linewidths=1.0, label="out of domain")),
    ):
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], **style)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("colour = given region (suggested where none)", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=1.2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_matrix(result) -> np.ndarray:
    c = len(result.regions)
    matrix = np.zeros((c, c), dtype=np.int64)
    labelled = result.given_index >= 0
    np.add.at(matrix, (result.given_index[labelled], result.suggested_index[labelled]), 1)
    return matrix


def confusion_html(result) -> str:
    matrix = confusion_matrix(result)
    used = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
    if not len(used):
        return '<p class="none">No given labels.</p>'
    esc = html.escape
    head = "".join(f'<th class="colhead">{esc(result.regions[j])}</th>' for j in used)
    body = []
    for i in used:
        total = max(matrix[i].sum(), 1)
        cells = []
        for j in used:
            n, share = matrix[i, j], matrix[i, j] / total
            colour = (
                (
                    f"rgba(36,88,198,{0.12 + 0.88 * share:.2f})"
                    if i == j
                    else f"rgba(194,55,44,{0.15 + 0.85 * share:.2f})"
                )
                if n
                else "#f7f8fa"
            )
            ink = "#fff" if n and share > 0.5 else "#1d2433"
            cells.append(
                f'<td style="background:{colour};color:{ink}" title="given {esc(result.regions[i])}, '
                f'predicted {esc(result.regions[j])}: {n}">{n or ""}</td>'
            )
        body.append(f'<tr><th class="rowhead">{esc(result.regions[i])}</th>{"".join(cells)}</tr>')
    return f'<table class="cm"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def region_counts_html(result) -> str:
    c = len(result.regions)
    labelled = result.given_index >= 0
    given = np.bincount(result.given_index[labelled], minlength=c)
    predicted = np.bincount(result.suggested_index, minlength=c)
    issues = np.bincount(result.given_index[result.is_issue], minlength=c)
    into = np.bincount(result.suggested_index[result.is_issue], minlength=c)
    filled = np.bincount(result.suggested_index[result.accepted() & result.unlabelled], minlength=c)
    rows = []
    for k in np.argsort(-(given + predicted), kind="stable"):
        if given[k] + predicted[k] == 0:
            continue
        share = f"{issues[k] / given[k]:.0%}" if given[k] else ""
        rows.append(
            f"<tr><td>{html.escape(result.regions[k])}</td><td class='num'>{given[k]}</td>"
            f"<td class='num'>{predicted[k]}</td><td class='num'>{issues[k]}</td><td class='num'>{share}</td>"
            f"<td class='num'>{into[k]}</td><td class='num'>{filled[k]}</td></tr>"
        )
    return (
        "<table><thead><tr><th>Region</th><th class='num'>Given</th><th class='num'>Predicted</th>"
        "<th class='num'>Suspected errors (given here)</th><th class='num'>Share</th>"
        "<th class='num'>Suggested into here</th><th class='num'>Filled-in labels</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _cards(counts: dict) -> str:
    cards = [
        ("images", "Images audited", ""),
        ("labelled", "With a given label", ""),
        ("issues", "Suspected label errors", "bad"),
        ("out_of_domain", "Out of domain", "warn"),
        ("unlabelled", "Without a label", ""),
        ("suggestions", "Labels suggested", "good"),
        ("unreadable", "Unreadable files", "bad" if counts["unreadable"] else ""),
    ]
    return "".join(
        f'<div class="card {cls}"><b>{counts[key]}</b><span>{label}</span></div>' for key, label, cls in cards
    )


def _issue_rows(result, order, thumbs, cams) -> str:
    esc = html.escape
    suggested, confidence = result.suggested_index, result.confidence
    rows = []
    for rank, i in enumerate(order, 1):
        thumb = f'<img class="thumb" alt="image" src="{thumbs[i]}">' if i in thumbs else ""
        cam = f'<img class="thumb" alt="Grad-CAM" src="{cams[i]}">' if i in cams else ""
        region = result.regions[suggested[i]]
        rows.append(
            f'<tr data-image="{esc(result.images[i])}" data-suggested="{esc(region)}">'
            f'<td class="num">{rank}</td><td>{thumb}</td><td>{cam}</td>'
            f'<td class="path" title="{esc(result.images[i])}">{esc(_short(result.images[i]))}</td>'
            f'<td class="given">{esc(result.given_text(i))}</td><td class="suggested">{esc(region)}</td>'
            f'<td class="num" data-v="{confidence[i]:.4f}"><span class="bar" style="width:{40 * confidence[i]:.0f}px">'
            f'</span>{confidence[i]:.0%}</td><td class="num" data-v="{result.issue_score[i]:.4f}">'
            f'{result.issue_score[i]:.3f}</td><td><input type="checkbox" checked aria-label="accept"></td></tr>'
        )
    if not rows:
        return '<tr><td colspan="9" class="none">No suspected label errors.</td></tr>'
    return "".join(rows)


def _short(image: str) -> str:
    parts = Path(image).parts
    return image if len(parts) <= 2 else "…/" + "/".join(parts[-2:])


def _gallery(result, indices, thumbs, caption) -> str:
    if not len(indices):
        return '<p class="none">None.</p>'
    figures = "".join(
        f'<figure><img class="thumb" alt="image" src="{thumbs[i]}"><figcaption>{caption(i)}<br>'
        f"{html.escape(Path(result.images[i]).name)}</figcaption></figure>"
        for i in indices
        if i in thumbs
    )
    more = len(indices) - sum(i in thumbs for i in indices)
    note = f'<p class="muted">{more} more in label_issues.csv.</p>' if more else ""
    return f'<div class="grid">{figures}</div>{note}'


def report_order(result) -> list[int]:
    rows = result.rows()
    return sorted(range(len(rows)), key=lambda i: suspicion_order(rows[i]))


def shown_indices(result, max_rows: int = 200) -> dict:
    """The images the report shows: suspected errors, out-of-domain and unlabelled ones, at most max_rows each."""
    order = report_order(result)
    return {
        "issues": [i for i in order if result.is_issue[i]][:max_rows],
        "ood": [i for i in order if result.out_of_domain[i]][:max_rows],
        "unlabelled": [
            int(i)
            for i in np.argsort(-result.confidence, kind="stable")
            if not result.given[i] and not result.out_of_domain[i]
        ][:max_rows],
    }


def render_report(result, images: dict, cams: dict, tsne_xy=None, max_rows: int = 200) -> str:
    """HTML text. `images`: index -> cleaned uint8 image; `cams`: index -> Grad-CAM map in [0, 1]."""
    esc = html.escape
    shown = shown_indices(result, max_rows)
    issues, ood, unlabelled = shown["issues"], shown["ood"], shown["unlabelled"]
    thumbs = {i: png_uri(images[i]) for i in set(issues) | set(ood) | set(unlabelled) if i in images}
    cam_uris = {i: png_uri(overlay(images[i], cams[i])) for i in issues if i in images and i in cams}
    regions = result.regions
    suggested = result.suggested_index
    tsne = (
        f'<img class="plot" alt="t-SNE" src="{tsne_plot(tsne_xy, result)}">'
        if tsne_xy is not None
        else '<p class="none">Too few images for a t-SNE plot.</p>'
    )
    errors = ""
    if result.errors:
        items = "".join(f"<li>{esc(str(e))}</li>" for e in result.errors[:500])
        errors = f'<section id="errors"><h2>Unreadable files ({len(result.errors)})</h2><ul>{items}</ul></section>'
    counts = result.counts()
    shown = f" (the {max_rows} most suspicious shown)" if counts["issues"] > max_rows else ""
    method = {
        "ours": "as many as confident learning estimates, the lowest self-confidence first (RadRegion)",
        "cleanlab": "cleanlab.filter.find_label_issues (confident learning)",
    }.get(result.method, result.method)
    fields = {
        "title": esc(result.source),
        "subtitle": esc(
            f"{result.source} · model {', '.join(result.models)} · "
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
        ),
        "cards": _cards(counts),
        "method_note": esc(
            f"Probabilities: {result.probabilities_from}. Suspected errors: {method}{shown}. "
            "Out-of-domain images are listed apart and never counted as label errors."
            + (f" Warning: {result.training_note()}" if result.training_note() else "")
        ),
        "issue_rows": _issue_rows(result, issues, thumbs, cam_uris),
        "unlabelled": _gallery(
            result,
            unlabelled,
            thumbs,
            lambda i: f"<b class='suggested'>{esc(regions[suggested[i]])}</b> {result.confidence[i]:.0%}",
        ),
        "ood": _gallery(
            result,
            ood,
            thumbs,
            lambda i: (
                f"score {result.ood_score[i]:.2f}{' · given ' + esc(result.given_text(i)) if result.given[i] else ''}"
            ),
        ),
        "confusion": confusion_html(result),
        "tsne": tsne,
        "region_counts": region_counts_html(result),
        "errors": errors,
        "footer": "RadRegion label audit. label_issues.csv holds every image, corrections.csv the accepted "
        "suggestions.",
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def write_report(path, result, images: dict, cams: dict, tsne_xy=None, max_rows: int = 200) -> Path:
    text = render_report(result, images, cams, tsne_xy, max_rows)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
