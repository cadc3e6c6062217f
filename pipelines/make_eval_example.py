"""Write the example set `streamprune eval` runs out of the box: held-out synthetic QA clips as video
files, with a multiple-choice version of each of their questions, in our MCQ shape.

    python -m pipelines.make_eval_example --out streamprune/assets/eval_example --clips 40

Clips are the first N of the `test` split (the ones `bench accuracy --n` reads, in the same order;
`--data-version 4` takes the video-like version),
encoded as lossless RGB H.264 so the decoded frames equal the rendered ones: `eval` on this set and
`bench accuracy` on the same questions see the same pixels. Each question's options are its answer
and up to three others of the same kind (colours, directions, numbers; the two other shapes), in an order drawn from
the clip's seed; `answer` is the correct option's letter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from streamprune.data.mcq import LETTERS
from streamprune.data.synthetic_qa import COLOURS, DIRECTIONS, NUMBERS, SHAPES, make_items
from streamprune.videofile import write_video

KINDS = (COLOURS, SHAPES, DIRECTIONS, NUMBERS)
FPS = 8.0


def options_for(answer: str, rng: np.random.Generator) -> tuple[list[str], str]:
    kind = next(k for k in KINDS if answer in k)
    others = [w for w in kind if w != answer]
    options = [answer, *rng.choice(others, size=min(3, len(others)), replace=False).tolist()]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return options, LETTERS[options.index(answer)]


def build(out: Path, clips: int, version: str = "3") -> int:
    items = make_items("test", num_clips=clips, version=version)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    records, written = [], {}
    for number, item in enumerate(items):
        seed = item.meta["seed"]
        video = f"clips/test_{seed}.mp4" if version == "3" else f"clips/v{version}_test_{seed}.mp4"
        if seed not in written:
            write_video(out / video, item.clip, FPS, codec="h264_lossless")
            written[seed] = 0
        written[seed] += 1
        options, letter = options_for(item.answer, np.random.default_rng([seed, written[seed]]))
        records.append({"id": f"test_{seed}_{written[seed]}", "video": video, "question": item.question,
                        "options": options, "answer": letter, "task_type": item.meta["type"],
                        "duration": len(item.clip) / FPS, "open_answer": item.answer, "seed": seed})
    (out / "example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("streamprune/assets/eval_example"))
    parser.add_argument("--clips", type=int, default=40, help="held-out test clips (default 40)")
    parser.add_argument("--data-version", default="3", choices=("3", "4"), help="synthetic QA data version")
    args = parser.parse_args()
    print(f"{build(args.out, args.clips, args.data_version)} questions on {args.clips} clips in {args.out}")


if __name__ == "__main__":
    main()
