"""Which weights stay resident (pinned) and which are streamed from disk, under a RAM budget.

Decoding walks layers 0..L-1 and then the classifier, over and over. Plain LRU would evict
exactly the unit needed next, so the plan pins a fixed set and streams the rest through a
small number of reusable slots (two: one computing, one being read ahead; one at the minimum
budget, where reads cannot overlap compute).

Accounting (what the budget covers): the run state (activations, the whole KV cache for
`seq_len`, the logits of a full batch), the final norm, every pinned unit, and `slots * slot_bytes` for streaming. The
embedding table is never resident: its rows are read one per token. Process overhead that does
not depend on the model (the interpreter, NumPy, code) is outside the budget; the benchmark
measures it.

Streamed layers are spread evenly among the pinned ones, so the reader keeps reading while
pinned layers compute instead of idling through a long pinned stretch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..formats.modelfile import Layout
from .budget import Budget, format_bytes, parse_budget

PAGE = 4096


@dataclass(frozen=True)
class Unit:
    """What is pinned or streamed as a whole: one transformer layer, or the classifier. Its bytes
    are byte-range spans: contiguous in a .m file, possibly not in a GGUF file."""

    index: int                        # layer index; n_layers for the classifier ("head")
    name: str
    start: int                        # [start, end): the file range that holds every span
    end: int
    core: tuple = ()                  # ((start, end), ...) always read: all of a dense layer,
                                      # a MoE layer without its experts
    experts: tuple = ()               # per expert id (MoE), its spans ((start, end), ...), read
                                      # on routing

    @property
    def spans(self) -> tuple:
        return self.core + tuple(s for ex in self.experts for s in ex)

    @property
    def nbytes(self) -> int:
        return sum(e - s for s, e in self.spans)

    @property
    def core_bytes(self) -> int:
        return sum(e - s for s, e in self.core)

    @property
    def regions(self) -> tuple:
        """The spans (core and experts) merged where they touch: what a slot buffer holds."""
        return merge_spans(self.spans)

    @property
    def slot_bytes(self) -> int:
        """Room for the regions packed in a slot, each from a page boundary at its offset within
        a page (reads start page-aligned; see store.py): up to two pages more per region."""
        return sum(e - s + 2 * PAGE for s, e in self.regions)

    def decode_read_bytes(self, k_active: int) -> int:
        """Bytes read for this unit by one decoded token (k_active routed experts for MoE)."""
        if not self.experts:
            return self.core_bytes
        return self.core_bytes + k_active * sum(e - s for s, e in self.experts[0])


MERGE_GAP = 256       # GGUF pads tensors to 32 bytes: read the padding rather than split a span


def merge_spans(ranges) -> tuple:
    """Sorted (start, end) ranges, those overlapping or a few padding bytes apart merged."""
    out: list = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1] + MERGE_GAP:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return tuple(out)


def model_units(layout: Layout) -> list[Unit]:
    """The layers in file order, then the classifier (index n_layers)."""
    h = layout.header
    units = []
    for l in range(h.n_layers):
        ts = layout.layer_tensors(l)
        core = merge_spans((t.offset, t.end) for t in ts if t.expert < 0)
        experts = tuple(merge_spans((t.offset, t.end) for t in ts if t.expert == e)
                        for e in range(h.n_experts))
        spans = core + tuple(s for ex in experts for s in ex)
        units.append(Unit(l, f"layer {l}", min(s for s, _ in spans), max(e for _, e in spans),
                          core, experts))
    w = layout["wcls"]
    units.append(Unit(h.n_layers, "classifier", w.offset, w.end, ((w.offset, w.end),)))
    return units


@dataclass(frozen=True)
class Residency:
    budget_bytes: int
    full_bytes: int                   # everything pinned, no slots
    min_bytes: int                    # everything streamed through one slot
    run_state_bytes: int
    fixed_bytes: int                  # final norm
    units: tuple
    pinned: tuple                     # unit indices, ascending
    streamed: tuple                   # unit indices in cycle order (ascending)
    slots: int
    slot_bytes: int
    k_active: int = 0
    notes: tuple = field(default=(), compare=False)

    @property
    def pinned_bytes(self) -> int:
        return sum(self.units[i].nbytes for i in self.pinned)

    @property
    def resident_bytes(self) -> int:
        """Bytes the plan keeps resident at most (the budget's accounting)."""
        return (self.run_state_bytes + self.fixed_bytes + self.pinned_bytes
                + self.slots * self.slot_bytes)

    @property
    def stream_bytes_per_token(self) -> int:
        """Weight bytes read from the file for one decoded token."""
        return sum(self.units[i].decode_read_bytes(self.k_active) for i in self.streamed)

    def is_streamed(self, index: int) -> bool:
        return index in self.streamed

    def describe(self) -> dict:
        n_layers = len(self.units) - 1
        return {
            "budget_bytes": self.budget_bytes, "full_bytes": self.full_bytes,
            "min_bytes": self.min_bytes, "run_state_bytes": self.run_state_bytes,
            "pinned_layers": [i for i in self.pinned if i < n_layers],
            "streamed_layers": [i for i in self.streamed if i < n_layers],
            "classifier": "streamed" if n_layers in self.streamed else "pinned",
            "pinned_bytes": self.pinned_bytes, "slots": self.slots, "slot_bytes": self.slot_bytes,
            "resident_bytes": self.resident_bytes,
            "stream_bytes_per_token": self.stream_bytes_per_token,
        }

    def summary(self) -> str:
        d = self.describe()
        return (f"RAM budget {format_bytes(self.budget_bytes)} (full {format_bytes(self.full_bytes)},"
                f" minimum {format_bytes(self.min_bytes)}): {len(d['pinned_layers'])} layers pinned,"
                f" {len(d['streamed_layers'])} streamed, classifier {d['classifier']};"
                f" {self.slots} slot(s) of {format_bytes(self.slot_bytes)};"
                f" about {format_bytes(self.stream_bytes_per_token)} read per decoded token")


def spread(count: int, total: int) -> list[int]:
    """`count` indices out of range(total), evenly spaced (count <= total)."""
    return sorted({(i * total) // count for i in range(count)}) if count else []


def _slot_bytes(units: list[Unit]) -> int:
    return max(u.slot_bytes for u in units)


def full_resident_bytes(layout: Layout, run_state_bytes: int) -> int:
    """What a run with every unit pinned keeps in RAM: what a percentage budget is a share of."""
    return run_state_bytes + layout["final_norm"].nbytes + sum(u.nbytes for u in model_units(layout))


def make_residency(layout: Layout, budget: "str | int | Budget", run_state_bytes: int) -> Residency:
    """Pin as much as `budget` allows; raise ConfigError if even one slot does not fit."""
    h = layout.header
    units = model_units(layout)
    layers, head = units[:-1], units[-1]
    fixed = layout["final_norm"].nbytes
    base = run_state_bytes + fixed
    full = full_resident_bytes(layout, run_state_bytes)
    min_bytes = base + _slot_bytes(units)
    budget_bytes = parse_budget(budget).resolve(full)
    common = dict(budget_bytes=budget_bytes, full_bytes=full, min_bytes=min_bytes,
                  run_state_bytes=run_state_bytes, fixed_bytes=fixed, units=tuple(units),
                  k_active=h.n_active_experts)
    if budget_bytes >= full:
        return Residency(pinned=tuple(u.index for u in units), streamed=(), slots=0, slot_bytes=0,
                    **common)
    if budget_bytes < min_bytes:
        raise ConfigError(
            f"RAM budget {format_bytes(budget_bytes)} is below the minimum of "
            f"{format_bytes(min_bytes)} ({min_bytes} bytes) for this model: one streamed unit "
            f"({format_bytes(_slot_bytes(units))}, the largest of a layer and the classifier) plus "
            f"the run state ({format_bytes(run_state_bytes)}: activations, logits and the KV cache; "
            f"a smaller max_seq_len shrinks it)")
    best = None
    for head_pinned in (True, False):
        for slots in (2, 1):
            cand = _candidate(layers, head, head_pinned, slots, budget_bytes - base)
            if cand is None:
                continue
            pinned, streamed = cand
            plan = Residency(pinned=pinned, streamed=streamed, slots=slots,
                        slot_bytes=_slot_bytes([units[i] for i in streamed]), **common)
            # Prefer prefetching (2 slots), then the fewest bytes read per token.
            key = (-min(slots, len(streamed)), plan.stream_bytes_per_token)
            if best is None or key < best[0]:
                best = (key, plan)
    assert best is not None, "min_bytes guarantees the all-streamed one-slot plan fits"
    return best[1]


def _candidate(layers: list[Unit], head: Unit, head_pinned: bool, slots: int,
               avail: int) -> "tuple[tuple, tuple] | None":
    """(pinned, streamed) unit indices, or None if this shape does not fit in avail bytes."""
    L = len(layers)
    if head_pinned:
        avail -= head.nbytes
    layer_bytes = max(u.nbytes for u in layers)
    slot = _slot_bytes(layers if head_pinned else layers + [head])
    avail -= slots * slot
    if avail < 0:
        return None
    n_pin = min(avail // layer_bytes, L - (1 if head_pinned else 0))
    n_stream = L - n_pin
    streamed = spread(n_stream, L)
    if not head_pinned:
        streamed.append(head.index)
    if not streamed:
        return None
    pinned = [u.index for u in layers if u.index not in set(streamed)]
    if head_pinned:
        pinned.append(head.index)
    return tuple(pinned), tuple(streamed)
