"""The world as indexed objects: entities, templates, prompt rendering and every response form's text.

Built once from :mod:`midpo.world.vocab`. The generator and the oracle both render responses through the
functions here, so what the generator writes is exactly what the oracle's sentence inventory holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from midpo.world import vocab as V

KINDS = ("harmful", "borderline", "benign")


@dataclass(frozen=True)
class Entity:
    """One prompt subject. ``value`` is the table-defined correct answer (None on harmful prompts)."""

    kind: str
    category: str  # benign: the table (capital, colour...); borderline/harmful: the scary verb
    index: int  # position within its block (kind, block)
    subject: str  # the text put into the template's {x}
    value: str | None = None
    group: str | None = None  # harmful: person / place / weapon (picks the safe alternative)

    @property
    def block(self) -> str:
        """The (template, entity) block the entity belongs to: benign tables have their own templates."""
        return self.category if self.kind == "benign" else self.kind


@dataclass(frozen=True)
class Template:
    block: str
    index: int
    opener: str
    frame: str

    def render(self, subject: str) -> str:
        body = self.frame.format(x=subject)
        return f"{self.opener} {body}" if self.opener else body


@dataclass(frozen=True)
class Block:
    """Templates x entities: every combination is one prompt."""

    kind: str
    name: str
    templates: tuple[Template, ...]
    entities: tuple[Entity, ...]


def _templates(block: str, frames: tuple[str, ...]) -> tuple[Template, ...]:
    pairs = [(o, f) for o in V.OPENERS for f in frames]
    return tuple(Template(block, i, o, f) for i, (o, f) in enumerate(pairs))


@lru_cache(maxsize=None)
def blocks() -> tuple[Block, ...]:
    """Every block of the world, in a fixed order: harmful, borderline, then the benign tables."""
    harmful: list[Entity] = []
    for verb in V.HARM_PERSON_VERBS:
        for victim in V.HARM_VICTIMS:
            harmful.append(Entity("harmful", verb, len(harmful), f"{verb} {victim}", None, "person"))
    for verb in V.HARM_PLACE_VERBS:
        for place in V.HARM_PLACES:
            harmful.append(Entity("harmful", verb, len(harmful), f"{verb} {place}", None, "place"))
    for weapon in V.HARM_WEAPONS:
        harmful.append(Entity("harmful", V.HARM_WEAPON_VERB, len(harmful), f"{V.HARM_WEAPON_VERB} {weapon}", None, "weapon"))
    border = [Entity("borderline", verb, i, phrase, answer) for i, (verb, phrase, answer) in enumerate(V.BORDERLINE_TABLE)]
    out = [
        Block("harmful", "harmful", _templates("harmful", V.ACT_FRAMES), tuple(harmful)),
        Block("borderline", "borderline", _templates("borderline", V.ACT_FRAMES), tuple(border)),
    ]
    for cat, rows in V.BENIGN_TABLES.items():
        ents = tuple(Entity("benign", cat, i, s, v) for i, (s, v) in enumerate(rows))
        out.append(Block("benign", cat, _templates(cat, V.BENIGN_FRAMES[cat]), ents))
    return tuple(out)


def blocks_of(kind: str) -> tuple[Block, ...]:
    return tuple(b for b in blocks() if b.kind == kind)


@lru_cache(maxsize=None)
def values_of(block: str) -> tuple[str, ...]:
    """The distinct table values of a block (the candidates for a wrong answer), in table order."""
    (b,) = [b for b in blocks() if b.name == block]
    return tuple(dict.fromkeys(e.value for e in b.entities if e.value is not None))


# --------------------------------------------------------------------------------------------------
# Response forms. Each returns the full response text.


def refusal(i: int) -> str:
    return V.REFUSALS[i % len(V.REFUSALS)]


def alternative_sentence(ent: Entity) -> str:
    return V.ALTERNATIVES[ent.group or "person"]


def safe_alternative(ent: Entity, i: int = 0) -> str:
    """A refusal that offers a safe alternative (harmful prompts)."""
    return f"{refusal(i)} {alternative_sentence(ent)}"


def answer_sentences(ent: Entity, value: str) -> tuple[str, str]:
    """(short sentence, detail sentence) of an answer to ``ent`` giving ``value``."""
    if ent.kind == "borderline":
        return V.BORDERLINE_SHORT.format(x=ent.subject, v=value), V.BORDERLINE_CLOSINGS[ent.index % len(V.BORDERLINE_CLOSINGS)]
    return V.BENIGN_SHORT[ent.category].format(x=ent.subject, v=value), V.BENIGN_DETAIL[ent.category].format(x=ent.subject, v=value)


def answer(ent: Entity, value: str, detailed: bool) -> str:
    """Short: the answer sentence. Detailed: "sure ." + the answer sentence + one more sentence."""
    short, detail = answer_sentences(ent, value)
    return f"{V.ACK} {short} {detail}" if detailed else short


def correct(ent: Entity, detailed: bool) -> str:
    assert ent.value is not None
    return answer(ent, ent.value, detailed)


def compliance(ent: Entity, tool: int, detailed: bool, steps: tuple[int, int] = (0, 1)) -> str:
    """Harmful compliance. Short: 1 harmful sentence; detailed: 4 (opening, two steps, closing)."""
    t = V.HARM_TOOLS[tool % len(V.HARM_TOOLS)]
    if not detailed:
        return f"{V.ACK} {V.COMPLY_SHORT.format(t=t, x=ent.subject)}"
    s1, s2 = (V.COMPLY_STEPS[s % len(V.COMPLY_STEPS)] for s in steps)
    return f"{V.ACK} {V.COMPLY_OPEN.format(t=t, x=ent.subject)} {s1} {s2} {V.COMPLY_CLOSE}"
