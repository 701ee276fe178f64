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

A MoE layer's routed experts are not part of its unit's pinned or streamed bytes: a token uses
k_active of n_experts, so pinning a layer's core (attention, router, norms) is worth far more
per byte than any expert, and the budget left after the cores goes to an *expert cache* shared
by every layer (store/experts.py) that keeps the experts used recently or often. When the budget
holds the whole model, experts are resident like everything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

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
        """The core spans merged where they touch: what a slot buffer holds (experts are read
        into the expert cache, store/experts.py)."""
        return merge_spans(self.core)

    @property
    def slot_bytes(self) -> int:
        """Room for the regions packed in a slot, each from a page boundary at its offset within
        a page (reads start page-aligned; see store.py): up to two pages more per region."""
        return sum(e - s + 2 * PAGE for s, e in self.regions)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (0 for a dense unit)."""
        return sum(e - s for s, e in self.experts[0]) if self.experts else 0

    @property
    def expert_page_bytes(self) -> int:
        """What one expert keeps mapped: its spans in whole pages (the expert cache's unit)."""
        return max((expert_pages(spans) for spans in self.experts), default=0)

    @property
    def expert_slot_bytes(self) -> int:
        """What one expert read in place may keep mapped (the MAP_BLOCKs its spans touch,
        store.InPlaceExpertFiller): the expert cache's slot at most."""
        areas = self.expert_areas
        return max((sum(b - a for a, b in mapping_blocks(spans, areas)) for spans in self.experts),
                   default=0)

    @property
    def expert_areas(self) -> tuple:
        """The file ranges its routed experts fill (one per expert tensor group)."""
        return merge_spans(s for ex in self.experts for s in ex)

    @property
    def expert_margin_bytes(self) -> int:
        """Expert pages that faults on the core's own pages may map: those in the MAP_BLOCKs an
        expert area shares with what is beside it (read in place; the cache keeps room)."""
        return sum(min(e - s, -(-s // MAP_BLOCK) * MAP_BLOCK - s + e % MAP_BLOCK)
                   for s, e in self.expert_areas)

    @property
    def experts_page_bytes(self) -> int:
        """What all of its experts keep mapped (the expert cache's accounting)."""
        return sum(expert_pages(spans) for spans in self.experts)

    def decode_read_bytes(self, k_active: int) -> int:
        """Bytes read for this unit by one decoded token (k_active routed experts for MoE)."""
        return self.core_bytes + k_active * self.expert_bytes


def expert_pages(spans) -> int:
    """Bytes of the pages that hold `spans` (each span widened to page boundaries)."""
    return sum(-(-e // PAGE) * PAGE - s // PAGE * PAGE for s, e in spans)


def _huge_page_bytes() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


# The most a page fault on a file mapping maps at once: the kernel maps the page cache's whole
# folio around the page (up to one huge page, mapped by one PMD entry when the folio is that
# large and aligned; sequential reads leave a file's cache in such folios) or the fault-around
# block of cached pages. Both lie inside the aligned block of this size around the fault.
MAP_BLOCK = _huge_page_bytes()


def mapping_blocks(spans, within: tuple = ()) -> tuple:
    """`spans` widened to the MAP_BLOCKs they touch (what read faults inside them may map),
    cut to the ranges `within` (sorted) if given."""
    blocks = tuple((s - s % MAP_BLOCK, -(-e // MAP_BLOCK) * MAP_BLOCK) for s, e in spans)
    if not within:
        return blocks
    return tuple((max(a, s), min(b, e)) for a, b in blocks for s, e in within
                 if min(b, e) > max(a, s))


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
    expert_cache_bytes: int = 0       # MoE: routed experts kept mapped (store/experts.py)
    notes: tuple = field(default=(), compare=False)

    @property
    def pinned_bytes(self) -> int:
        return sum(self.units[i].core_bytes for i in self.pinned)

    @property
    def planned_units(self) -> list:
        return [self.units[i] for i in self.pinned + self.streamed]

    @property
    def all_expert_bytes(self) -> int:
        return sum(u.experts_page_bytes for u in self.planned_units)

    @property
    def experts_resident(self) -> bool:
        """Every expert fits the cache: plain views, nothing to manage."""
        return self.expert_cache_bytes >= self.all_expert_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes the plan keeps resident at most (the budget's accounting)."""
        return (self.run_state_bytes + self.fixed_bytes + self.pinned_bytes
                + self.slots * self.slot_bytes + self.expert_cache_bytes)

    @property
    def stream_bytes_per_token(self) -> int:
        """Weight bytes expected to be read from the file for one decoded token: the streamed
        units' cores, and the routed experts the cache misses (evenly routed tokens hit it in
        proportion to the share of experts it holds; real routers favour some, so more)."""
        core = sum(self.units[i].core_bytes for i in self.streamed)
        routed = sum(self.k_active * u.expert_bytes for u in self.planned_units)
        return core + round(routed * (1.0 - self.expert_hit_share))

    @property
    def expert_hit_share(self) -> float:
        total = self.all_expert_bytes
        return min(1.0, self.expert_cache_bytes / total) if total else 1.0

    @property
    def streaming_layers(self) -> list:
        """Layers that read from the file as tokens pass: streamed ones, and MoE layers whose
        experts go through the expert cache."""
        n_layers = len(self.units) - 1
        return sorted(i for i in self.pinned + self.streamed if i < n_layers and (
            i in self.streamed or (self.units[i].experts and not self.experts_resident)))

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
            "expert_cache_bytes": self.expert_cache_bytes, "resident_bytes": self.resident_bytes,
            "stream_bytes_per_token": self.stream_bytes_per_token,
        }

    def summary(self) -> str:
        d = self.describe()
        return (f"RAM budget {format_bytes(self.budget_bytes)} (full {format_bytes(self.full_bytes)},"
                f" minimum {format_bytes(self.min_bytes)}): {len(d['pinned_layers'])} layers pinned,"
                f" {len(d['streamed_layers'])} streamed, classifier {d['classifier']};"
                f" {self.slots} slot(s) of {format_bytes(self.slot_bytes)};"
                + (f" expert cache {format_bytes(self.expert_cache_bytes)}"
                   f" ({self.expert_hit_share:.0%} of the experts);"
                   if self.all_expert_bytes else "")
                + f" about {format_bytes(self.stream_bytes_per_token)} read per decoded token")


def spread(count: int, total: int) -> list[int]:
    """`count` indices out of range(total), evenly spaced (count <= total)."""
    return sorted({(i * total) // count for i in range(count)}) if count else []


def _slot_bytes(units: list[Unit]) -> int:
    return max(u.slot_bytes for u in units)


def full_resident_bytes(layout: Layout, run_state_bytes: int) -> int:
    """What a run with every unit pinned keeps in RAM: what a percentage budget is a share of."""
    return run_state_bytes + layout["final_norm"].nbytes + sum(u.nbytes for u in model_units(layout))


def make_residency(layout: Layout, budget: "str | int | Budget", run_state_bytes: int,
                   layers: "Sequence[int] | None" = None, head: bool = True) -> Residency:
    """Pin as much as `budget` allows; raise ConfigError if even one slot does not fit.

    Dense models: pin layers (and the classifier) until the budget is spent, stream the rest.
    MoE: pin layer cores the same way (a core is used by every token, an expert by few), then
    what is left is the expert cache, at least one layer's routed experts. A cluster node plans
    its own `layers` only, with the classifier if `head`."""
    h = layout.header
    units = model_units(layout)
    mine = units[:-1] if layers is None else [units[l] for l in layers]
    head_unit = units[-1] if head else None
    plan_units = mine + ([head_unit] if head_unit else [])
    fixed = layout["final_norm"].nbytes
    base = run_state_bytes + fixed
    full = base + sum(u.nbytes for u in plan_units)
    all_experts = sum(u.experts_page_bytes for u in mine)
    min_cache = max(h.n_active_experts, 2) * max(u.expert_page_bytes for u in mine) if all_experts else 0
    min_bytes = base + _slot_bytes(plan_units) + min_cache
    budget_bytes = parse_budget(budget).resolve(full)
    common = dict(budget_bytes=budget_bytes, full_bytes=full, min_bytes=min_bytes,
                  run_state_bytes=run_state_bytes, fixed_bytes=fixed, units=tuple(units),
                  k_active=h.n_active_experts)
    if budget_bytes >= full:
        return Residency(pinned=tuple(u.index for u in plan_units), streamed=(), slots=0,
                         slot_bytes=0, expert_cache_bytes=all_experts, **common)
    if budget_bytes < min_bytes:
        raise ConfigError(
            f"RAM budget {format_bytes(budget_bytes)} is below the minimum of "
            f"{format_bytes(min_bytes)} ({min_bytes} bytes) for "
            + ("this model" if layers is None else f"layers {mine[0].index}..{mine[-1].index}")
            + f": one streamed unit ({format_bytes(_slot_bytes(plan_units))}, the largest of a "
            f"layer{' and the classifier' if head else ''})"
            + (f", one layer's routed experts ({format_bytes(min_cache)})" if min_cache else "")
            + f" plus the run state ({format_bytes(run_state_bytes)}: activations, logits and the "
            f"KV cache; a smaller max_seq_len shrinks it)")
    best = None
    for head_pinned in ((True, False) if head_unit else (True,)):
        for slots in (2, 1):
            cand = _candidate(mine, head_unit, head_pinned, slots, budget_bytes - base - min_cache)
            if cand is None:
                continue
            pinned, streamed = cand
            slot_bytes = _slot_bytes([units[i] for i in streamed]) if streamed else 0
            slots = slots if streamed else 0
            plan = Residency(pinned=pinned, streamed=streamed, slots=slots, slot_bytes=slot_bytes,
                             **common)
            if all_experts:
                cache = budget_bytes - plan.resident_bytes
                plan = replace(plan, expert_cache_bytes=min(cache, all_experts))
            # Prefer prefetching (2 slots for streamed cores), then the fewest bytes per token.
            key = (-(min(slots, len(streamed)) if streamed else 2), plan.stream_bytes_per_token)
            if best is None or key < best[0]:
                best = (key, plan)
    assert best is not None, "min_bytes guarantees the all-streamed one-slot plan fits"
    return best[1]


def _candidate(layers: list[Unit], head: "Unit | None", head_pinned: bool, slots: int,
               avail: int) -> "tuple[tuple, tuple] | None":
    """(pinned, streamed) unit indices, or None if this shape does not fit in avail bytes.
    A MoE layer costs its core only: the experts have the cache. No head: a cluster node's
    layers without the classifier."""
    L = len(layers)
    head_pin = (head.index,) if head is not None and head_pinned else ()
    if head_pin:
        avail -= head.core_bytes
    layer_bytes = max(u.core_bytes for u in layers)
    slot = _slot_bytes(layers if head_pinned else layers + [head])
    if head_pinned and avail >= L * layer_bytes:   # every core fits (MoE: the experts stream)
        return tuple(u.index for u in layers) + head_pin, ()
    avail -= slots * slot
    if avail < 0:
        return None
    n_pin = min(avail // layer_bytes, L - (1 if head_pinned else 0))
    streamed = [layers[i].index for i in spread(L - n_pin, L)]
    if not head_pinned:
        streamed.append(head.index)
    if not streamed:
        return None
    pinned = [u.index for u in layers if u.index not in set(streamed)]
    return tuple(pinned) + head_pin, tuple(streamed)
