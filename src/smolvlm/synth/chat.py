"""Text-only chat prompts for replay: what a user asks a small assistant, with no image.

The default model's LoRA adapts every projection of the frozen SmolLM2; trained on short visual
answers alone it forgets how to chat ("Name three fruits." -> "lemons"). Stage 2 therefore mixes
in text-only turns whose answers are the backbone's own (``training/replay.py``). This module only
makes the questions: ``chat_prompts(n, seed)`` is ``n`` distinct prompts, a pure function of
``(n, seed)`` like the rest of ``synth``.
"""

from __future__ import annotations

import random

COUNTRIES = ("France Germany Italy Spain Japan Canada Brazil Egypt India Mexico Norway Greece Portugal Kenya "
             "Australia Sweden Poland Chile Peru Ireland Turkey Austria Argentina Finland Vietnam").split()
GROUPS = ("fruits", "vegetables", "animals", "colours", "sports", "musical instruments", "planets", "birds",
          "flowers", "tools", "countries in Europe", "kinds of weather", "board games", "trees", "sea animals",
          "things in a kitchen", "school subjects", "farm animals", "kinds of bread", "hobbies")
TOPICS = ("the sea", "the moon", "winter", "cats", "music", "coffee", "trains", "forests", "rain", "mountains",
          "friendship", "books", "the city at night", "autumn leaves", "a summer morning", "the desert",
          "bicycles", "the stars", "a quiet library", "gardens", "snow", "the river", "breakfast", "dogs",
          "the wind", "a long journey", "the ocean waves", "spring flowers", "a rainy day", "the sun")
CONCEPTS = ("gravity", "photosynthesis", "a computer", "a volcano", "the internet", "a rainbow", "electricity",
            "an atom", "a cloud", "the water cycle", "a battery", "a telescope", "a vaccine", "an earthquake",
            "a map", "a calendar", "a library", "a bridge", "the weather", "a recipe")
ADJECTIVES = ("happy", "big", "fast", "cold", "bright", "quiet", "old", "strong", "easy", "early", "tall",
              "soft", "clean", "rich", "heavy", "young", "dark", "wet", "full", "short")
THINGS = ("the sky", "grass", "snow", "a banana", "a tomato", "the sun", "coal", "milk", "an orange",
          "a lemon", "a strawberry", "the sea", "a carrot", "chocolate", "a leaf in summer")
ANIMALS = ("octopuses", "elephants", "owls", "penguins", "bees", "dolphins", "cats", "giraffes", "ants",
           "whales", "horses", "butterflies", "frogs", "camels", "parrots")
GREETINGS = ("Hello!", "Hi, who are you?", "Good morning!", "What can you do?", "Thank you for your help.",
             "Can you help me?", "How are you today?", "Tell me a joke.")
TIPS = ("sleeping well", "learning a language", "staying healthy", "saving money", "reading", "drinking water",
        "exercise", "cooking at home", "being kind", "studying")
DIGITS = tuple(str(i) for i in range(1, 10))

# (templates, a word list per "{}"): a kind is drawn uniformly, then a template, then each filler
KINDS: tuple[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = (
    (("What is the capital of {}?",), (COUNTRIES,)),
    (("Name three {}.", "List three {}.", "Give me three examples of {}."), (GROUPS,)),
    (("Write one sentence about {}.", "Write a short sentence about {}.", "Describe {} in one sentence."), (TOPICS,)),
    (("What is {} + {}?",), (DIGITS, DIGITS)),
    (("Explain what {} is in simple words.", "What is {}?", "Explain {} to a child."), (CONCEPTS,)),
    (("What is the opposite of {}?", "Give me a word that means {}.", "Use the word \"{}\" in a sentence."), (ADJECTIVES,)),
    (("What colour is {}?",), (THINGS,)),
    (("Tell me a fun fact about {}.",), (ANIMALS,)),
    (GREETINGS, ()),
    (("Write a short poem about {}.",), (TOPICS,)),
    (("Give me one tip for {}.", "Why is {} important?"), (TIPS,)),
    (("Why do {} need water?", "Where do {} live?", "What do {} eat?"), (ANIMALS,)),
)


def _prompt(rng: random.Random) -> str:
    templates, fillers = KINDS[rng.randrange(len(KINDS))]
    template = templates[0] if len(templates) == 1 else rng.choice(templates)
    return template.format(*(rng.choice(words) for words in fillers))


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct text-only prompts, deterministic in ``(n, seed)`` (a prefix of a longer list)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"smolvlm-synth/chat/{seed}")
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        p = _prompt(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct chat prompts exist, asked for {n}")
    return out
