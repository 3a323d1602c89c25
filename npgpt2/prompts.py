"""Prompt sets the walkthroughs share: indirect object identification (IOI).

"When John and Mary went to the shops, John gave the bag to" -> " Mary": the subject (John) is
repeated, the indirect object (Mary) is the answer. Each template is used with both name orders, so
the answer is not a fixed position or a fixed name (Wang et al. 2022; TransformerLens's
Exploratory Analysis Demo uses these eight).
"""

from __future__ import annotations

IOI_TEMPLATES = (
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
)
IOI_NAMES = ((" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy"))
# Three names that appear in no clean prompt: a corrupted prompt uses them in the three places
CORRUPT_NAMES = (" Alice", " Bob", " Carl")


def ioi_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """The eight prompts (each template with the name order swapped) and their (answer, wrong)
    names: prompt 2k and 2k+1 are the same sentence with the other name repeated."""
    prompts, answers = [], []
    for fmt, pair in zip(IOI_TEMPLATES, IOI_NAMES):
        for j in range(2):
            answer, subject = pair[j], pair[1 - j]
            prompts.append(fmt.format(subject))
            answers.append((answer, subject))
    return prompts, answers


def ioi_corrupted(prompts, answers) -> list[str]:
    """Each prompt with its three names replaced by ``CORRUPT_NAMES`` ("When Alice and Bob went to
    the shops, Carl gave the bag to"): the same sentence with no name to copy."""
    corrupted = []
    for text, (answer, subject) in zip(prompts, answers):
        text = text.replace(answer, CORRUPT_NAMES[0]).replace(subject, CORRUPT_NAMES[1], 1)
        corrupted.append(text.replace(subject, CORRUPT_NAMES[2], 1))
    return corrupted
