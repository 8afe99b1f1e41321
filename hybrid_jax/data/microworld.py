"""The micro-world: a seeded synthetic world of fictional entities and facts.

Machines here cannot download weights or data sets, so the project brings its own world
to learn and to be measured in (DESIGN.md, "Where there are no Qwen3-0.6B weights"):

* `World(WorldConfig(...))` draws people, cities, companies and creatures with attributes.
* `world.corpus()`      pretraining documents: the facts of one entity in varied templates.
* `world.instruct()`    chat QA: [{"role": "user", ...}, {"role": "assistant", ...}].
* `world.open_questions()` / `world.multiple_choice()`  evaluation on the same facts.
* `associative_recall(...)` / `passkey(...)`  long-context tasks (no world needed).

Everything is a pure function of the seed: Python's `random.Random`, whose streams are
stable across Python versions, drives every choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence

# Value domains. Entity names are generated; these words are shared attribute values.
OCCUPATIONS = ("baker", "painter", "farmer", "sailor", "doctor", "teacher", "miner",
               "weaver", "potter", "singer", "tailor", "hunter")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink",
           "brown")
PRODUCTS = ("lamps", "boats", "clocks", "shoes", "bread", "paper", "glass", "rope", "tea",
            "soap")
HABITATS = ("forest", "desert", "swamp", "river", "mountains", "caves", "meadow", "lake")
FOODS = ("berries", "fish", "mushrooms", "seeds", "leaves", "insects", "honey", "roots")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "tr", "st", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "k", "s")


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
    """One attribute of an entity kind: where its values come from and how it is said."""

    name: str
    domain: str  # "cities", "people" or a key of _DOMAINS
    statements: tuple[str, ...]  # "{s}" = subject, "{v}" = value
    questions: tuple[str, ...]  # questions[0] is the evaluation question


_DOMAINS = {"occupations": OCCUPATIONS, "colours": COLOURS, "products": PRODUCTS,
            "habitats": HABITATS, "foods": FOODS}

KINDS: dict[str, tuple[AttributeSpec, ...]] = {
    "person": (
        AttributeSpec("home_city", "cities",
                      ("{s} lives in {v}.", "{s} is from {v}.", "The home city of {s} is {v}.",
                       "{s} has a house in {v}."),
                      ("Where does {s} live?", "What is the home city of {s}?",
                       "Which city is {s} from?")),
        AttributeSpec("occupation", "occupations",
                      ("{s} works as a {v}.", "{s} is a {v}.", "The job of {s} is {v}.",
                       "By trade, {s} is a {v}."),
                      ("What is the job of {s}?", "What does {s} do for a living?",
                       "What does {s} work as?")),
        AttributeSpec("favourite_colour", "colours",
                      ("{s} likes the colour {v}.", "The favourite colour of {s} is {v}.",
                       "{s} loves {v} things.", "Of all colours, {s} likes {v} best."),
                      ("What is the favourite colour of {s}?", "Which colour does {s} like?",
                       "What colour does {s} love?")),
    ),
    "company": (
        AttributeSpec("founder", "people",
                      ("{s} was founded by {v}.", "The founder of {s} is {v}.",
                       "{v} founded {s}.", "{v} started the company {s}."),
                      ("Who founded {s}?", "Who is the founder of {s}?",
                       "Who started the company {s}?")),
        AttributeSpec("headquarters", "cities",
                      ("{s} is based in {v}.", "The headquarters of {s} are in {v}.",
                       "{s} has its office in {v}.", "The office of {s} is in {v}."),
                      ("Where is {s} based?", "In which city is {s} based?",
                       "Where is the office of {s}?")),
        AttributeSpec("product", "products",
                      ("{s} makes {v}.", "The main product of {s} is {v}.", "{s} sells {v}.",
                       "People buy {v} from {s}."),
                      ("What does {s} make?", "What is the main product of {s}?",
                       "What does {s} sell?")),
    ),
    "creature": (
        AttributeSpec("habitat", "habitats",
                      ("The {s} lives in the {v}.", "You can find the {s} in the {v}.",
                       "The home of the {s} is the {v}.", "The {s} is found in the {v}."),
                      ("Where does the {s} live?", "Where can you find the {s}?",
                       "What is the home of the {s}?")),
        AttributeSpec("food", "foods",
                      ("The {s} eats {v}.", "The favourite food of the {s} is {v}.",
                       "The {s} feeds on {v}.", "The {s} lives on {v}."),
                      ("What does the {s} eat?", "What is the favourite food of the {s}?",
                       "What does the {s} feed on?")),
    ),
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. The default (64 entities, 180 facts) is small enough for a
    ~2M-parameter Qwen3 to learn on 2 CPU cores in minutes."""

    seed: int = 0
    num_people: int = 40
    num_cities: int = 10
    num_companies: int = 12
    num_creatures: int = 12
    corpus_variants: int = 4  # documents per entity, each with fresh templates and order
    question_templates: int = 3  # instruct QA per fact (1..3 phrasings)
    # Instruct chats per fact that ask with lettered options (fresh distractors each time, never
    # the evaluation set's draw), so generation-scored multiple choice is a format the model knows.
    mc_instruct: int = 1

    def __post_init__(self):
        for f in ("num_people", "num_cities", "num_companies", "num_creatures"):
            if getattr(self, f) < 4:
                raise ValueError(f"WorldConfig.{f}={getattr(self, f)}: need at least 4 "
                                 "(multiple choice draws 3 distractors from each domain)")
        if self.corpus_variants < 1:
            raise ValueError(f"WorldConfig.corpus_variants={self.corpus_variants}: need >= 1")
        if self.mc_instruct < 0:
            raise ValueError(f"WorldConfig.mc_instruct={self.mc_instruct}: need >= 0")
        if not 1 <= self.question_templates <= 3:
            raise ValueError(f"WorldConfig.question_templates={self.question_templates}: "
                             "must be 1, 2 or 3")

    @classmethod
    def from_dict(cls, d) -> WorldConfig:
        """From a dict of fields, or a preset name: "default" or "large"."""
        if isinstance(d, str):
            if d not in PRESETS:
                raise ValueError(f"unknown micro-world preset {d!r}; choose from {sorted(PRESETS)} "
                                 "or give a dict of WorldConfig fields")
            return PRESETS[d]
        if isinstance(d, WorldConfig):
            return d
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown micro-world setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


# A world for the ~100M-parameter GPU teacher: 3100 entities, 8500 facts.
LARGE_WORLD = WorldConfig(seed=0, num_people=2000, num_cities=100, num_companies=500,
                          num_creatures=500)
PRESETS = {"default": WorldConfig(), "large": LARGE_WORLD}


def data_world(data) -> WorldConfig:
    """The micro-world a run's `data` section trains on, which is the world to evaluate on:
    `data.world` when set, else the one world its micro-world sources name (a `microworld`
    source's `world`, or a `microworld/<task>_large` TFDS name), else the default world.

    `data` is a mapping or ConfigDict shaped like `hybrid_jax.config`'s `data` section.
    """
    if data.get("world"):
        return WorldConfig.from_dict(data["world"])
    sources = data.get("sources") or []
    if hasattr(sources, "values"):  # the name -> source mapping form
        sources = list(sources.values())
    worlds = set()
    for s in sources:
        if s.get("kind") == "microworld":
            worlds.add(WorldConfig.from_dict(s.get("world") or "default"))
        elif s.get("kind") == "tfds" and str(s.get("name", "")).startswith("microworld/"):
            worlds.add(LARGE_WORLD if str(s["name"]).split(":")[0].endswith("_large") else WorldConfig())
    if len(worlds) > 1:
        raise ValueError(f"data.sources read {len(worlds)} different micro-worlds; set data.world to the one "
                         "to evaluate on (a preset name or a dict of WorldConfig fields)")
    return worlds.pop() if worlds else WorldConfig()


# Long-context training chats (`long_context_chats`): tasks, default context range in tokens, count.
LONG_CONTEXT_TASKS = ("passkey", "mqar")
LONG_CONTEXT_MIN, LONG_CONTEXT_MAX, LONG_CONTEXT_EXAMPLES = 128, 1024, 2000


@dataclasses.dataclass(frozen=True)
class Fact:
    kind: str
    entity: str
    attribute: str
    value: str


class World:
    """Entities and facts drawn from `WorldConfig.seed`."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        rng = random.Random(self.config.seed)
        used: set[str] = set(OCCUPATIONS + COLOURS + PRODUCTS + HABITATS + FOODS)

        def names(n, syllables, capital):
            out = []
            while len(out) < n:
                w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                            for _ in range(syllables))
                if w not in used:
                    used.add(w)
                    out.append(w.capitalize() if capital else w)
            return out

        c = self.config
        self.cities = names(c.num_cities, 2, True)
        self.people = names(c.num_people, 2, True)
        self.companies = [n + " " + rng.choice(("Works", "Labs", "Trading", "and Sons"))
                          for n in names(c.num_companies, 2, True)]
        self.creatures = names(c.num_creatures, 2, False)
        domains = dict(_DOMAINS, cities=tuple(self.cities), people=tuple(self.people))
        self.domains = domains
        self.entities = {"person": self.people, "company": self.companies,
                         "creature": self.creatures}
        self.facts: list[Fact] = []
        for kind, specs in KINDS.items():
            for entity in self.entities[kind]:
                for spec in specs:
                    self.facts.append(Fact(kind, entity, spec.name,
                                           rng.choice(domains[spec.domain])))
        self._spec = {(k, s.name): s for k, specs in KINDS.items() for s in specs}
        self._by_entity: dict[str, list[Fact]] = {}
        for f in self.facts:
            self._by_entity.setdefault(f.entity, []).append(f)

    def spec(self, fact: Fact) -> AttributeSpec:
        return self._spec[(fact.kind, fact.attribute)]

    def facts_of(self, entity: str) -> list[Fact]:
        return list(self._by_entity[entity])

    # ---- training data -------------------------------------------------------------
    def corpus(self) -> list[dict]:
        """Pretraining documents: {"text"}; each lists one entity's facts."""
        rng = random.Random(self.config.seed + 1)
        docs = []
        for variant in range(self.config.corpus_variants):
            for kind in KINDS:
                for entity in self.entities[kind]:
                    facts = self.facts_of(entity)
                    rng.shuffle(facts)
                    sentences = []
                    for i, f in enumerate(facts):
                        # Variant v starts at template v so every template is seen.
                        tpl = self.spec(f).statements
                        t = tpl[(variant + i) % len(tpl)] if variant < len(tpl) else rng.choice(tpl)
                        sentences.append(t.format(s=f.entity, v=f.value))
                    docs.append({"text": " ".join(sentences)})
        return docs

    def instruct(self) -> list[dict]:
        """Chat QA: {"messages": [user question, assistant short answer]} per fact and
        phrasing (`question_templates` phrasings, the first being the evaluation one)."""
        out = []
        for t in range(self.config.question_templates):
            for f in self.facts:
                q = self.spec(f).questions[t].format(s=f.entity)
                out.append({"messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": f.value}]})
        for i in range(self.config.mc_instruct):
            for e in self._multiple_choice(random.Random(self.config.seed + 3 + i)):
                out.append({"messages": [{"role": "user", "content": options_text(e)},
                                         {"role": "assistant", "content": e["choices"][e["answer_index"]]}]})
        return out

    # ---- evaluation ----------------------------------------------------------------
    def open_questions(self) -> list[dict]:
        """{"question", "answer", "entity", "attribute"}: the answer is one short phrase."""
        return [{"question": self.spec(f).questions[0].format(s=f.entity), "answer": f.value,
                 "entity": f.entity, "attribute": f.attribute} for f in self.facts]

    def multiple_choice(self) -> list[dict]:
        """4 options per fact; the 3 distractors come from the same attribute's domain."""
        return self._multiple_choice(random.Random(self.config.seed + 2))

    def _multiple_choice(self, rng: random.Random) -> list[dict]:
        out = []
        for f in self.facts:
            pool = [v for v in self.domains[self.spec(f).domain] if v != f.value]
            choices = rng.sample(pool, 3) + [f.value]
            rng.shuffle(choices)
            out.append({"question": self.spec(f).questions[0].format(s=f.entity),
                        "choices": choices, "answer_index": choices.index(f.value),
                        "entity": f.entity, "attribute": f.attribute})
        return out

    def task(self, name: str) -> list[dict]:
        """Records of one task by name (the TFDS builder configs use these names)."""
        tasks = {"corpus": self.corpus, "instruct": self.instruct,
                 "open": self.open_questions, "mc": self.multiple_choice}
        if name == "long_context" or name.startswith("long_context_"):
            return self.long_context(*parse_long_context_task(name))
        if name not in tasks:
            raise ValueError(f"unknown micro-world task {name!r}; choose from {sorted(tasks)} "
                             "or long_context[_MIN_MAX] (long-context evaluation tasks: "
                             "associative_recall, passkey)")
        return tasks[name]()

    def long_context(self, min_length: int = LONG_CONTEXT_MIN, max_length: int = LONG_CONTEXT_MAX,
                     num_examples: int = LONG_CONTEXT_EXAMPLES) -> list[dict]:
        """Passkey and MQAR chats (`long_context_chats`) whose contexts are `min_length`..`max_length`
        tokens of this world's micro-world tokenizer (vocabulary 1024, built and cached on first use)."""
        from hybrid_jax.data.tokenizer import micro_tokenizer

        tok = micro_tokenizer(world=self.config)
        return long_context_chats(num_examples, min_length, max_length, seed=self.config.seed,
                                  count_tokens=lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))


def options_text(example: dict) -> str:
    """The question followed by its lettered options, one per line."""
    lines = [example["question"]]
    lines += [f"{'ABCD'[i]}. {c}" for i, c in enumerate(example["choices"])]
    return "\n".join(lines)


def format_multiple_choice(example: dict) -> str:
    """The question with lettered options, ending where the answer letter goes."""
    return options_text(example) + "\nAnswer:"


# ---- long-context tasks ------------------------------------------------------------------
def _word_count(text: str) -> int:
    return len(text.split())


def associative_recall(context_length: int, num_examples: int = 8, num_queries: int = 8,
                       seed: int = 0,
                       count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """Multi-query associative recall: key-value pairs, then queries about some of them.

    Returns {"context", "queries", "answers", "context_length"}: the context lists
    "key: value" lines (keys are made-up words, values 4-digit numbers) and ends with
    "\\n"; ask query i with `mqar_prompt(example, i)`. Length is measured with
    `count_tokens` (pass `lambda s: len(tok(s).input_ids)` for token lengths) and
    defaults to whitespace-separated words; the context stays within `context_length`.
    """
    count = count_tokens or _word_count
    rng = random.Random(hash_seed("mqar", seed, context_length))
    header = "Remember each key and its value.\n"
    out = []
    for _ in range(num_examples):
        used, lines, length = set(), [], count(header)
        while True:
            key = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2))
            if key in used:
                continue
            line = f"{key}: {rng.randrange(1000, 10000)}\n"
            n = count(line)
            if length + n > context_length:
                break
            used.add(key)
            lines.append(line)
            length += n
        if len(lines) < num_queries:
            raise ValueError(f"context_length={context_length} holds only {len(lines)} pairs; "
                             f"need >= num_queries={num_queries}")
        picked = rng.sample(range(len(lines)), num_queries)
        pairs = [lines[i].rstrip("\n").split(": ") for i in picked]
        out.append({"context": header + "".join(lines), "queries": [k for k, _ in pairs],
                    "answers": [v for _, v in pairs], "context_length": context_length})
    return out


def mqar_prompt(example: dict, i: int) -> str:
    return example["context"] + f"What is the value of {example['queries'][i]}?"


_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")


def passkey(context_length: int, num_examples: int = 8, seed: int = 0,
            count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """Passkey retrieval: a 5-digit key hidden at a random depth in repeated filler.

    Returns {"context", "question", "answer", "depth_percent", "context_length"}; the prompt is
    `context + question`, the answer the key. Length as in `associative_recall`.
    """
    count = count_tokens or _word_count
    rng = random.Random(hash_seed("passkey", seed, context_length))
    head = ("There is an important pass key hidden inside a lot of irrelevant text. "
            "Find it and remember it. ")
    question = "What is the pass key? The pass key is"
    budget = context_length - count(head) - count(question) - 16  # 16: room for the needle
    n_filler = max(budget // max(count(_FILLER), 1), 1)
    out = []
    for _ in range(num_examples):
        key = str(rng.randrange(10000, 100000))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        depth = rng.randrange(n_filler + 1)
        context = head + _FILLER * depth + needle + _FILLER * (n_filler - depth)
        out.append({"context": context, "question": question, "answer": key,
                    "depth_percent": round(100 * depth / n_filler), "context_length": context_length})
    return out


def hash_seed(*parts) -> int:
    """A stable 32-bit seed from parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


MQAR_LENGTHS: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192)
PASSKEY_LENGTHS: Sequence[int] = (1024, 2048, 4096, 8192, 16384, 32768)


# ---- long-context training chats ---------------------------------------------------------


def parse_long_context_task(name: str) -> tuple[int, int]:
    """Context range of a task name: "long_context" (the defaults) or "long_context_MIN_MAX"."""
    if name == "long_context":
        return LONG_CONTEXT_MIN, LONG_CONTEXT_MAX
    parts = name.split("_")[2:]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"micro-world task {name!r}: write 'long_context' or 'long_context_MIN_MAX' "
                         "with the context range in tokens, e.g. 'long_context_128_1024'")
    return int(parts[0]), int(parts[1])


def long_context_chats(num_examples: int, min_length: int = LONG_CONTEXT_MIN,
                       max_length: int = LONG_CONTEXT_MAX, *, seed: int = 0,
                       tasks: Sequence[str] = LONG_CONTEXT_TASKS,
                       count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """Long-context retrieval as training chats: user = context + question, assistant = the reply.

    Record i alternates over `tasks` ("passkey": `passkey`'s context and question, reply
    "The pass key is K." for the 5-digit key K; "mqar": `associative_recall` with one query,
    reply "key: V" for the 4-digit value V) and draws its context length log-uniformly from
    [min_length, max_length] (lengths as in `passkey`: `count_tokens`, default words). The reply
    repeats the phrase that precedes the answer in the context, so its digits follow the same
    tokens there and here: the copy an induction head makes (with the bare digits as the reply,
    a 0.9M-parameter teacher stayed at chance; docs/long_context.md). Each record also carries
    "task", "context_length", "answer" (the digits; scoring takes a reply's first number) and
    "reply". Record i depends only on (seed, i, range), so a longer list extends a shorter one.
    The prompts are exactly what `hybrid_jax.eval.long_context` asks, so a model trained on
    these is scored on the format it learnt (asked as a chat).
    """
    if not 0 < min_length <= max_length:
        raise ValueError(f"long_context_chats: need 0 < min_length <= max_length, got {min_length}, {max_length}")
    unknown = sorted(set(tasks) - set(LONG_CONTEXT_TASKS))
    if unknown or not tasks:
        raise ValueError(f"long_context_chats: tasks={tuple(tasks)!r}; choose from {LONG_CONTEXT_TASKS}")
    out = []
    for i in range(num_examples):
        rng = random.Random(hash_seed("long_context_chats", seed, i))
        task = tasks[i % len(tasks)]
        length = round(min_length * (max_length / min_length) ** rng.random())
        sub = rng.randrange(2**31)
        if task == "passkey":
            e = passkey(length, 1, seed=sub, count_tokens=count_tokens)[0]
            question, answer = e["context"] + e["question"], e["answer"]
            reply = f"The pass key is {answer}."
        else:
            e = associative_recall(length, 1, num_queries=1, seed=sub, count_tokens=count_tokens)[0]
            question, answer = mqar_prompt(e, 0), e["answers"][0]
            reply = f"{e['queries'][0]}: {answer}"
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": reply}],
                    "task": task, "context_length": length, "answer": answer, "reply": reply})
    return out
