"""The plan as the table `distill-jax plan` prints."""

from __future__ import annotations

import math

from distill_jax.planning.estimate import human_bytes, human_seconds

COLUMNS = (
    "program",
    "batch",
    "fits",
    "memory/chip",
    "args",
    "temp",
    "GFLOP/call",
    "GB/call",
    "roofline/call",
    "bound",
    "img/s/chip",
    "calls",
    "predicted",
)


def _number(value: float, form: str) -> str:
    return format(value, form) if math.isfinite(value) else "-"


def _row(entry: dict) -> list[str]:
    if entry["problem"]:
        return [entry["name"], str(entry["batch"]), "no", *["-"] * 9, entry["problem"]]
    fits = "yes" if entry["fits"] else "NO"
    memory = f"{human_bytes(entry['total_bytes'])} of {human_bytes(entry['hbm_bytes'])}"
    return [
        entry["name"] + (f" (= {entry['same_as']})" if entry["same_as"] else ""),
        str(entry["batch"]),
        fits,
        memory,
        human_bytes(entry["argument_bytes"]),
        human_bytes(entry["temp_bytes"]),
        _number(entry["flops"] / 1e9, ",.1f"),
        _number(entry["bytes_accessed"] / 1e9, ",.2f"),
        human_seconds(entry["seconds"]),
        entry["bound"] or "-",
        _number(entry["images_per_s"], ",.0f"),
        f"{entry['calls']:,}",
        human_seconds(entry["stage_seconds"]) if entry["kind"] == "train" else "-",
    ]


def format_plan(plan: dict) -> str:
    """The plan as a fixed-width table, with the advice, totals and the chip's source below."""
    rows = [list(COLUMNS)] + [_row(entry) for entry in plan["programs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        f"{plan['topology']} ({plan['libtpu_topology'] or 'this machine'}): {plan['chips']} "
        f"chips, mesh data={plan['mesh']['data']} x fsdp={plan['mesh']['fsdp']}; samplers: "
        f"{plan['sample_batch_per_chip']} images per call on one chip",
        "",
    ]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    lines.append("")
    for entry in plan["programs"]:
        if entry["advice"]:
            lines.append(f"{entry['name']} does not fit: {entry['advice']}.")
    lines += [
        f"Distillation (stage one and every round): {human_seconds(plan['distillation_seconds'])};"
        f" every training stage: {human_seconds(plan['total_train_seconds'])} (roofline: a lower "
        "bound).",
        f"Chip: {plan['chip']['source']}.",
        f"Planned on {plan['planned_on']} in {plan['planning_seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
