"""Prompts and answer parsing for multiple-choice video QA, as lmms-eval does them.

Prompts are each benchmark's lmms-eval `default` prompt (its task yaml's pre/post prompt and its
`doc_to_text`). Answers are decoded greedily (max 16 new tokens) and parsed by the rule that
benchmark's lmms-eval task uses:

- `first_letter`: LongVideoBench's `parse_multi_choice_response` (lmms_eval/tasks/longvideobench/
  utils.py): drop the answer prefixes ("The best answer is", ...), then the first option letter
  anywhere in what is left; more than 10 words with no option letter is unparsable. Deviation:
  lmms-eval then picks a random option; we count an unparsable answer wrong.
- `ranked`: lmms-eval's shared `extract_mcq_answer` (lmms_eval/tasks/_task_utils/mcq_extract.py),
  which VideoMME and MLVU use: letters found in several formats ("(B)", "B.", "B:", "B)", "B ",
  after an answer phrase, alone at the start or end) ranked by format, the last of the best
  format winning; a letter anywhere only when no format matched; none -> unparsable (wrong).

A model that answers with the option's words instead (our default model, whose word-level
vocabulary has no letters) is scored on `text`: the answer equals the correct option's text.
"""

from __future__ import annotations

import re

from streamprune.data.mcq import LETTERS, MCQItem

MAX_NEW_TOKENS = 16  # every lmms-eval video MCQ task's generation_kwargs
LETTER_POST_PROMPT = "Answer with the option's letter from the given choices directly."
VIDEOMME_OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video "
                          "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
MLVU_POST_PROMPT = "\nOnly give the best option.\nBest option: ("
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:")
ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                  "best answer is", "the correct option is", "correct option is", "the best option is",
                  "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                  "i choose", "i select", "i pick", "my answer is", "my choice is")
FORMAT_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
               "space": 2, "fallback": 0}
PARSER_OF = {"videomme": "ranked", "mlvu": "ranked", "longvideobench": "first_letter", "mcq": "first_letter"}


def letter_prompt(item: MCQItem) -> str:
    """The benchmark's lmms-eval prompt with the options lettered as its task file letters them."""
    lettered = [f"{LETTERS[i]}. {text}" for i, text in enumerate(item.options)]
    if item.benchmark == "videomme":
        return f"{VIDEOMME_OPTION_PROMPT}\n{item.question}\n" + "\n".join(lettered) + f"\n\n{LETTER_POST_PROMPT}"
    if item.benchmark == "mlvu":  # MLVU's question carries its options as "(A) text" lines
        return item.question + "\n" + "\n".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(item.options)) \
            + MLVU_POST_PROMPT
    return f"{item.question}\n" + "\n".join(lettered) + f"\n{LETTER_POST_PROMPT}\n"


def parse_first_letter(answer: str, letters: str) -> str | None:
    text = answer.strip()
    for prefix in ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(f"[{letters}]", text)  # (lmms-eval's "> 10 words and no letter" is the same case)
    return None if found is None else found.group(0)


def parse_ranked(answer: str, letters: str) -> str | None:
    if not answer.strip():
        return None
    text = answer.strip()
    for mark in ",.!?;:'\"":  # one mark after the other, as lmms-eval strips them
        text = text.strip(mark)
    padded = f" {text} "
    found: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for letter in letters:
        for form, name in ((f"({letter})", "parentheses"), (f"{letter}.", "period"), (f"{letter}:", "colon"),
                           (f"{letter})", "right_paren"), (f"{letter} ", "space")):
            if form in padded:
                found.append((FORMAT_RANK[name], padded.rfind(form), letter))
    lower = padded.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            for letter in letters:
                where = padded.find(letter, at + len(phrase))
                if where >= 0:
                    found.append((FORMAT_RANK["phrase"], where, letter))
    stripped = padded.strip()
    for letter in letters:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            found.append((FORMAT_RANK["start"], 0, letter))
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            found.append((FORMAT_RANK["end"], len(padded) - 1, letter))
    if not found:
        found = [(FORMAT_RANK["fallback"], padded.rfind(letter), letter) for letter in letters if letter in padded]
    return max(found)[2] if found else None


PARSERS = {"first_letter": parse_first_letter, "ranked": parse_ranked}


def parse_letter(answer: str, item: MCQItem, parser: str | None = None) -> str | None:
    """The option letter `answer` names under the benchmark's rule (or `parser`); None: unparsable."""
    return PARSERS[parser or PARSER_OF[item.benchmark]](answer, LETTERS[:len(item.options)])


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def names_correct_text(answer: str, item: MCQItem) -> bool:
    """The answer is the correct option's text (case and punctuation aside)."""
    return _words(answer) == _words(item.options[item.answer])
