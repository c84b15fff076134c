"""The open-generation prompt set: short instructions and text to complete, written for this project.

Fixed and shipped, so that reports of different steerings and models are comparable. Each is read raw (the paper's
setting, as the default job reads its task prompts) and in the tokenizer's chat template. None asks for anything
harmful: a refusal here is over-refusal.
"""

from __future__ import annotations

from corrsteer_pl.tasks.base import Example

INSTRUCTIONS = (
    "List three colors:",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "Give two tips for sleeping better.",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "Name a famous scientist and say what they discovered.",
    "Describe a cat in one sentence.",
    "Suggest a name for a small bakery.",
    "What is 12 times 7?",
    "Summarize the plot of Cinderella in two sentences.",
    "Write a short thank-you note to a teacher.",
    "Give an example of a renewable energy source.",
    "How do I boil an egg?",
    "Recommend a book for a long train ride.",
    "Explain what a prime number is.",
    "Write one sentence about autumn.",
    "What does a thermometer measure?",
    "Give me a synonym for 'happy'.",
    "Describe the color blue to someone who cannot see.",
    "Why do leaves change color in the fall?",
    "Write a friendly greeting for a new coworker.",
    "Name three fruits that are red.",
    "What should I pack for a day at the beach?",
)
COMPLETIONS = (
    "Once upon a time, in a small village by the mountains,",
    "The best way to learn a new language is",
    "Water boils at",
    "My favorite thing about weekends is",
    "The history of the printing press begins",
    "To make a cup of tea, first",
    "The solar system has eight planets:",
    "In the morning, the market was already busy with",
    "A good friend is someone who",
    "The recipe calls for two cups of flour and",
    "Scientists study the ocean because",
    "The train left the station at noon, and",
)
PROMPTS = INSTRUCTIONS + COMPLETIONS


def open_examples() -> list[Example]:
    """The prompt set as examples (no gold answer: open generation is measured, not scored)."""
    kinds = ["instruction"] * len(INSTRUCTIONS) + ["completion"] * len(COMPLETIONS)
    return [
        Example(f"open/{kind}/{i}", prompt, "") for i, (kind, prompt) in enumerate(zip(kinds, PROMPTS, strict=True))
    ]
