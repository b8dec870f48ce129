"""The scene generator (trimcpp.scenes), the dataset reader, `trimcpp eval`, and the bundled mini VLM.

Scoring is checked on the tiny random-weight models by turning their own keep-all replies into
the answer key: keep-all must then score 100% and every other setting exactly the share of its
replies that match, counted here from the handler directly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from llama_cpp import Llama

from trimcpp import TrimLlava15ChatHandler
from trimcpp.cli import main
from trimcpp.images import image_messages
from trimcpp.quality import scenes
from trimcpp.quality.evaluate import BUNDLED, load, normalise


def test_scenes_are_reproducible_and_seeds_differ():
    a = [(np.asarray(im), qa) for im, _, qa in scenes.split(7, 3)]
    b = [(np.asarray(im), qa) for im, _, qa in scenes.split(7, 3)]
    c = [(np.asarray(im), qa) for im, _, qa in scenes.split(8, 3)]
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert not any(np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_answers_follow_from_the_drawn_shapes():
    for i in range(200):
        rng = np.random.default_rng([11, i])
        image, shapes = scenes.scene(rng)
        assert 3 <= len(shapes) <= 8 and image.size == (224, 224)
        for question, answer in scenes.questions(rng, shapes, n=8):
            words = question.rstrip("?").split()
            assert answer in scenes.ANSWERS
            if question.startswith("What color is the"):
                [s] = [s for s in shapes if s.kind == words[-1]]
                assert answer == s.color
            elif question.startswith("How many"):
                assert scenes.NUMBERS.index(answer) == sum(s.kind + "s" == words[2] for s in shapes)
            elif question.startswith("Is there a"):
                assert (answer == "yes") == any((s.color, s.kind) == (words[3], words[4]) for s in shapes)
            else:
                [s] = [s for s in shapes if (s.color, s.kind) == (words[2], words[3])]
                pixel = np.asarray(image)[int(s.y), int(s.x)]
                assert tuple(pixel) == scenes.COLORS[s.color]  # the shape is drawn where it says
                if "left" in words:
                    assert answer == ("left" if s.x < 112 else "right")
                else:
                    assert answer == ("top" if s.y < 112 else "bottom")


def kind(question: str) -> str:
    for start, name in (("What", "colour"), ("How", "count"), ("Is there", "exists")):
        if question.startswith(start):
            return name
    return "side" if "left" in question else "height"


def test_question_kinds_are_balanced():
    kinds = [kind(q) for _, _, qa in scenes.split(5, 300, per_image=2) for q, _ in qa]
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert len(counts) == 5 and min(counts.values()) > 0.1 * len(kinds)
    answers = [a for _, _, qa in scenes.split(5, 300, per_image=2) for _, a in qa]
    assert abs(answers.count("yes") - answers.count("no")) < 0.5 * (answers.count("yes") + answers.count("no"))


def test_question_kind_names_every_generated_question():
    for _, _, qa in scenes.split(6, 40):
        for q, _ in qa:
            assert scenes.question_kind(q) == kind(q)
    assert set(scenes.QUESTION_KINDS) == set(ANSWER_WORDS)


def test_evidence_is_the_named_shapes():
    shapes = [scenes.Figure("square", "blue", 21.0, 35.0, 6.0), scenes.Figure("circle", "red", 150.0, 100.0, 20.0),
              scenes.Figure("circle", "green", 60.0, 180.0, 9.0)]
    labels = scenes.patch_labels(shapes)

    def patches_of(s):  # patches that hold the shape's centre or lie well inside its box
        return {int(y // 14) * 16 + int(x // 14) for x in (s.x - s.r / 2, s.x, s.x + s.r / 2)
                for y in (s.y - s.r / 2, s.y, s.y + s.r / 2)}

    def within(patches, *figures):  # every patch touches the box of one of `figures`
        return all(any(abs((p % 16) * 14 + 7 - f.x) < f.r + 7 and abs((p // 16) * 14 + 7 - f.y) < f.r + 7
                       for f in figures) for p in patches)

    square, red, green = shapes
    cases = {"What color is the square?": [square], "How many circles are there?": [red, green],
             "Is there a red circle?": [red], "Is the green circle on the left or right?": [green],
             "Is the red circle at the top or bottom?": [red]}
    for question, figures in cases.items():
        got = set(np.flatnonzero(scenes.evidence(question, labels)))
        assert set().union(*map(patches_of, figures)) <= got and within(got, *figures), question
    for question in ("Is there a green square?", "How many triangles are there?", "Describe the image."):
        assert not scenes.evidence(question, labels).any(), question


def test_patch_labels():
    shapes = [scenes.Figure("square", "blue", 21.0, 35.0, 6.0), scenes.Figure("circle", "red", 150.0, 100.0, 20.0)]
    labels = scenes.patch_labels(shapes).reshape(16, 16)
    blue_square = 1 + 3 * list(scenes.COLORS).index("blue") + scenes.KINDS.index("square")
    red_circle = 1 + 3 * list(scenes.COLORS).index("red") + scenes.KINDS.index("circle")
    # The square spans x 15..27, y 29..41: inside patch (2, 1) only.
    assert labels[2, 1] == blue_square and (labels == blue_square).sum() == 1
    # The circle spans x 130..170, y 80..120: patches 9..12 across, 5..8 down (corners mostly empty).
    assert labels[7, 10] == red_circle and set(np.flatnonzero(labels.ravel() == red_circle) // 16) == {5, 6, 7, 8}
    assert (labels[:, :8] != red_circle).all() and labels[0, 0] == 0


def test_write_split_and_load(tmp_path):
    folder = scenes.write_split(tmp_path / "split", seed=3, images=4, per_image=2)
    records = json.loads((folder / "questions.json").read_text())
    assert len(records) == 8 and sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    questions = load(folder)
    assert [(q.image.name, q.question, q.answer) for q in questions] == [
        (r["image"], r["question"], r["answer"]) for r in records]


@pytest.mark.parametrize(("content", "message"), [
    (None, "no questions.json"), ("{not json", "not valid JSON"), ("[]", "non-empty list"),
    ('[{"image": "a.png", "question": "q"}]', "record 0 needs"),
    ('[{"image": "missing.png", "question": "q", "answer": "a"}]', "not in"),
])
def test_load_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "questions.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_normalise():
    assert [normalise(s) for s in (" Red.", "yes, it is", "TOP!", "", "  ...")] == ["red", "yes", "top", "", ""]


def test_eval_scores_against_the_answer_key(capsys, models, tmp_path):
    llm, mmproj = models["llm"], models["1.5"]
    folder = scenes.write_split(tmp_path / "data", seed=4, images=4, size=84, per_image=2)
    records = json.loads((folder / "questions.json").read_text())
    handler = TrimLlava15ChatHandler(clip_model_path=mmproj, keep=None, verbose=False, reuse_kv=False)
    threads = os.cpu_count()  # as trimcpp eval
    llama = Llama(model_path=llm, chat_handler=handler, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                  verbose=False, seed=0)

    def replies(method, keep):
        handler.method, handler.keep = method, keep
        out = []
        for r in records:
            reply = llama.create_chat_completion(messages=image_messages((folder / r["image"]).read_bytes(), r["question"]),
                                                 max_tokens=4, temperature=0.0)
            out.append(normalise(reply["choices"][0]["message"]["content"] or ""))
        return out

    key = replies("none", None)
    for r, answer in zip(records, key):
        r["answer"] = answer
    (folder / "questions.json").write_text(json.dumps(records))
    expected = {(m, k): np.mean([a == b for a, b in zip(replies(m, k), key)])
                for m in ("uniform", "trimtokenator") for k in (36, 4)}

    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--methods", "none,uniform,trimtokenator",
                 "--keep", "36,4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["questions"] == 8
    cells = {(r["method"], r["keep"]): r for r in result["results"]}
    assert set(cells) == {("none", None), ("uniform", 36), ("uniform", 4), ("trimtokenator", 36), ("trimtokenator", 4)}
    assert cells[("none", None)]["accuracy"] == 1.0 and cells[("none", None)]["mean_kept"] == 36
    for (method, keep), accuracy in expected.items():
        assert cells[(method, keep)]["accuracy"] == pytest.approx(accuracy)
        assert cells[(method, keep)]["relative"] == pytest.approx(accuracy)
        assert cells[(method, keep)]["mean_kept"] == min(keep, 36)
    assert cells[("uniform", 36)]["accuracy"] == 1.0  # keep >= rows: the same rows as keep-all

    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--methods", "none,align",
                 "--keep", "8", "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "keep 8" in out and "2 questions" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("none", "align"))] == ["none", "align"]


@pytest.mark.parametrize("args", [["--methods", "best"], ["--methods", ""], ["--keep", "0"], ["--limit", "0"]])
def test_eval_bad_arguments(capsys, args):
    with pytest.raises(SystemExit) as stop:
        main(["eval", *args])
    assert stop.value.code == 2
    capsys.readouterr()


def test_eval_bad_dataset(capsys, models, tmp_path):
    llm, mmproj = models["llm"], models["1.5"]
    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(tmp_path)])
    assert code == 2 and "no questions.json" in capsys.readouterr().err


ANSWER_WORDS = {"colour": set(scenes.COLORS), "count": set(scenes.NUMBERS[1:]), "exists": {"yes", "no"},
                "side": {"left", "right"}, "height": {"top", "bottom"}}


def test_bundled_mini_vlm_reads_the_picture():
    """The trained model shipped in trimcpp/data, through llama.cpp keeping every row: each reply is
    a word of the asked kind, and it beats the best answer that ignores the picture (the most
    frequent answer of each question kind)."""
    questions = load(BUNDLED["data"])
    assert len(questions) == 400
    handler = TrimLlava15ChatHandler(clip_model_path=str(BUNDLED["mmproj"]), keep=None, verbose=False)
    llama = Llama(model_path=str(BUNDLED["model"]), chat_handler=handler, n_ctx=2048, verbose=False, seed=0)
    sample = questions[:80]
    right, by_kind = 0, {}
    for q in sample:
        reply = llama.create_chat_completion(messages=image_messages(q.image.read_bytes(), q.question), max_tokens=4,
                                             temperature=0.0)
        answer = normalise(reply["choices"][0]["message"]["content"] or "")
        assert answer in ANSWER_WORDS[kind(q.question)], (q.question, answer)
        right += answer == q.answer
        by_kind.setdefault(kind(q.question), []).append(q.answer)
    blind = sum(max(answers.count(a) for a in set(answers)) for answers in by_kind.values())
    assert right > blind


def test_coverage_counts_the_evidence_rows_kept(tmp_path):
    """`python -m trimcpp.quality.minivlm coverage` on the first scenes of the test split: keeping
    every row keeps all of each question's evidence; 4 random rows of 256 do not."""
    from trimcpp.quality.minivlm.coverage import coverage
    from trimcpp.quality.minivlm.stages import MINI, SEEDS

    folder = scenes.write_split(tmp_path / "split", SEEDS["test"], 3, MINI.image_size, per_image=2)
    result = coverage(BUNDLED["model"].parent, folder, ("random", "trimtokenator"), (256, 4))
    about_a_figure = sum(scenes.evidence(q, scenes.patch_labels(figures)).any()
                         for _, figures, pairs in scenes.split(SEEDS["test"], 3, per_image=2) for q, _ in pairs)
    assert about_a_figure >= 3
    for method in ("random", "trimtokenator"):
        assert result[f"{method} 256"] == {"evidence_kept": 1.0, "any_evidence_kept": 1.0, "questions": about_a_figure}
    assert result["random 4"]["evidence_kept"] < 0.5


def _picture(seed: int, fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


def test_pope_jsonl(tmp_path):
    (tmp_path / "val2014").mkdir()
    for i in range(3):
        (tmp_path / "val2014" / f"COCO_{i}.jpg").write_bytes(_picture(i, "JPEG"))
    lines = [{"question_id": 1, "image": "COCO_0.jpg", "text": "Is there a dog in the image?", "label": "yes"},
             {"question_id": 2, "image": "COCO_1.jpg", "text": "Is there a cat in the image?", "label": "no"},
             {"image": "COCO_2.jpg", "question": "Is there a car?", "answer": "Yes"}]
    data = tmp_path / "coco_pope_random.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    questions = load(data, tmp_path / "val2014")
    assert [(q.question, q.answer) for q in questions] == [("Is there a dog in the image?", "yes"),
                                                           ("Is there a cat in the image?", "no"),
                                                           ("Is there a car?", "yes")]
    assert [q.picture() for q in questions] == [_picture(i, "JPEG") for i in range(3)]
    with pytest.raises(ValueError, match="'COCO_0.jpg' is not in"):
        load(data)  # the pictures are not beside the file
    data.write_text(json.dumps(lines[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        load(data, tmp_path / "val2014")
    data.write_text(json.dumps({"image": "COCO_0.jpg", "text": "q"}) + "\n")
    with pytest.raises(ValueError, match="line 1: needs string fields"):
        load(data, tmp_path / "val2014")


def _tsv(path, rows) -> None:
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    path.write_text("\t".join(columns) + "\n" + "".join("\t".join(str(r.get(c, "nan")) for c in columns) + "\n"
                                                        for r in rows))


def test_mmbench_tsv(tmp_path):
    import base64

    picture = base64.b64encode(_picture(7)).decode()
    rows = [{"index": 10, "question": "What is shown?", "hint": "A farm.", "A": "a cow", "B": "a boat", "C": "a car",
             "answer": "A", "category": "x", "image": picture},
            {"index": 11, "question": "Which colour?", "A": "red", "B": "green", "answer": "B", "image": "10"}]
    data = tmp_path / "MMBench_DEV_EN.tsv"
    _tsv(data, rows)
    first, second = load(data)
    assert first.question == ("Hint: A farm.\nQuestion: What is shown?\nOptions:\nA. a cow\nB. a boat\nC. a car\n"
                              "Please select the correct answer from the options above. \n")
    assert second.question == ("Question: Which colour?\nOptions:\nA. red\nB. green\n"
                               "Please select the correct answer from the options above. \n")
    assert (first.answer, second.answer) == ("a", "b") and normalise("B. green") == second.answer
    assert first.picture() == second.picture() == _picture(7) and first.image is None

    for change, message in (({"image": "99"}, "refers to index 99"), ({"image": "bm90IGEgcGljdHVyZQ=="}, "not a base64"),
                            ({"answer": "D"}, "'D' is not one of the row's options")):
        _tsv(data, [{**rows[0], **change}])
        with pytest.raises(ValueError, match=message):
            load(data)
    data.write_text("index\tquestion\n1\tq\n")
    with pytest.raises(ValueError, match="no column answer, image, A"):
        load(data)
    with pytest.raises(ValueError, match="is not a dataset"):
        load(tmp_path / "questions.csv")


def test_eval_reads_jsonl_and_tsv(capsys, models, tmp_path):
    """trimcpp eval on both formats: the answer key is the keep-all model's own replies, so keep-all
    scores 100% and each question was asked with its picture and prompt."""
    import base64

    llm, mmproj = models["llm"], models["1.5"]
    for i in range(2):
        (tmp_path / f"p{i}.png").write_bytes(_picture(i))
    handler = TrimLlava15ChatHandler(clip_model_path=mmproj, keep=None, verbose=False, reuse_kv=False)
    threads = os.cpu_count()
    llama = Llama(model_path=llm, chat_handler=handler, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                  verbose=False, seed=0)

    def reply(picture: bytes, question: str) -> str:
        out = llama.create_chat_completion(messages=image_messages(picture, question), max_tokens=4, temperature=0.0)
        return normalise(out["choices"][0]["message"]["content"] or "")

    replies = [reply(_picture(i), "Is there a dog?") for i in range(2)]
    labels = [replies[0] or "x", "certainly-not-a-reply"]
    (tmp_path / "pope.jsonl").write_text("\n".join(json.dumps({"image": f"p{i}.png", "text": "Is there a dog?",
                                                               "label": labels[i]}) for i in range(2)))
    rows = [{"index": 1, "question": "Which?", "A": "one", "B": "two", "answer": "A",
             "image": base64.b64encode(_picture(0)).decode()}]
    _tsv(tmp_path / "mc.tsv", rows)
    prompt = "Question: Which?\nOptions:\nA. one\nB. two\nPlease select the correct answer from the options above. \n"
    for data, want in (("pope.jsonl", replies), ("mc.tsv", [reply(_picture(0), prompt)])):
        code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(tmp_path / data), "--methods",
                     "none,trimtokenator", "--keep", "8", "--json"])
        result = json.loads(capsys.readouterr().out)
        cells = {r["method"]: r for r in result["results"]}
        assert code == 0 and result["questions"] == len(want)
        assert cells["none"]["answers"] == want  # each question asked with its picture and prompt
        assert cells["trimtokenator"]["mean_kept"] == 8
    assert cells["none"]["accuracy"] == float(want[0] == "a")
    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(tmp_path / "pope.jsonl"), "--methods",
                 "none", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["results"][0]["accuracy"] == 0.5 * (replies[0] == labels[0])
    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(tmp_path / "mc.tsv"), "--images", "x"])
    assert code == 2 and "--images goes with a .jsonl" in capsys.readouterr().err


def test_method_specs():
    from trimcpp.quality.evaluate import method_spec
    from trimcpp.selection import DEFAULT_ALIGNMENT, DEFAULT_STAGE1_RATIO

    assert method_spec("trimtokenator") == ("trimtokenator", DEFAULT_ALIGNMENT, DEFAULT_STAGE1_RATIO)
    assert method_spec("trimtokenator+l2") == ("trimtokenator", "l2", DEFAULT_STAGE1_RATIO)
    assert method_spec("trimtokenator+cosine+adaptive") == ("trimtokenator", "cosine", "adaptive")
    assert method_spec("align+cosine", 0.5) == ("align", "cosine", 0.5)
    for bad in ("best", "trimtokenator+cosine+cosine", "divprune+bar", "+cosine", "trimtokenator+l2+cosine"):
        with pytest.raises(ValueError, match="unknown method"):
            method_spec(bad)
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--methods", "trimtokenator+bar"])
    assert stop.value.code == 2


def test_eval_runs_each_variant(capsys, models, tmp_path):
    """A method spec's variant reaches the handler: its answers are those of a handler built with it."""
    llm, mmproj = models["llm"], models["1.5"]
    folder = scenes.write_split(tmp_path / "data", seed=5, images=2, size=84, per_image=2)
    records = json.loads((folder / "questions.json").read_text())
    threads = os.cpu_count()
    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--methods",
                 "align,align+cosine,trimtokenator+adaptive", "--keep", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    got = {r["method"]: r["answers"] for r in result["results"]}
    for spec, options in (("align", {"method": "align"}), ("align+cosine", {"method": "align", "alignment": "cosine"}),
                          ("trimtokenator+adaptive", {"stage1_ratio": "adaptive"})):
        handler = TrimLlava15ChatHandler(clip_model_path=mmproj, keep=3, verbose=False, reuse_kv=False, **options)
        llama = Llama(model_path=llm, chat_handler=handler, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                      verbose=False, seed=0)
        want = [normalise(llama.create_chat_completion(
            messages=image_messages((folder / r["image"]).read_bytes(), r["question"]), max_tokens=4,
            temperature=0.0)["choices"][0]["message"]["content"] or "") for r in records]
        assert got[spec] == want, spec


def test_cluttered_scenes(tmp_path):
    from trimcpp.quality.minivlm.coverage import coverage
    from trimcpp.quality.minivlm.stages import MINI, SEEDS

    drawn = list(scenes.split(SEEDS["test"], 30, style="cluttered"))
    assert [np.asarray(a[0]).tobytes() for a in drawn[:3]] == [
        np.asarray(a[0]).tobytes() for a in scenes.split(SEEDS["test"], 3, style="cluttered")]
    plain = next(scenes.split(SEEDS["test"], 1))
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(drawn[0][0]))
    for image, figures, pairs in drawn:
        kinds = [f.kind for f in figures]
        assert 8 <= len(figures) <= 14 and len(pairs) == 8
        assert min(kinds.count(k) for k in set(kinds)) <= 1 < max(kinds.count(k) for k in set(kinds))
        background = np.asarray(image)[scenes.patch_labels(figures).reshape(16, 16).repeat(14, 0).repeat(14, 1) == 0]
        assert len(np.unique(background, axis=0)) > 1000  # textured and strewn with marks, not flat
    with pytest.raises(ValueError, match="style must be one of plain, cluttered, crowded"):
        scenes.scene(np.random.default_rng(0), style="busy")

    folder = scenes.write_split(tmp_path / "c", SEEDS["test"], 2, MINI.image_size, per_image=2, style="cluttered")
    assert json.loads((folder / "split.json").read_text())["style"] == "cluttered"
    result = coverage(BUNDLED["model"].parent, folder, ("trimtokenator+cosine",), (256,))
    assert result["trimtokenator+cosine 256"]["evidence_kept"] == 1.0


def test_crowded_scenes(tmp_path):
    """24-40 figures of one size, each look 1-4 times; every question names its figures by colour
    and kind, its answer follows from the drawing, and its evidence is those figures' patches."""
    from trimcpp.quality.minivlm.stages import MINI, SEEDS

    drawn = list(scenes.split(SEEDS["test"], 40, style="crowded"))
    assert np.asarray(drawn[0][0]).tobytes() == np.asarray(next(scenes.split(SEEDS["test"], 1, style="crowded"))[0]).tobytes()
    kinds = []
    for _, figures, pairs in drawn:
        looks = [(f.color, f.kind) for f in figures]
        assert 24 <= len(figures) <= 40 and all(7 <= f.r <= 10 for f in figures)
        assert max(looks.count(x) for x in looks) <= 4
        assert min([f.kind for f in figures].count(k) for k in scenes.KINDS) >= 2  # no kind occurs once
        labels = scenes.patch_labels(figures)
        assert (labels > 0).sum() > 64  # more figure patches than 64 kept rows
        for question, answer in pairs:
            words = question.rstrip("?").split()
            kinds.append(scenes.question_kind(question))
            assert answer in ANSWER_WORDS[kinds[-1]] and kinds[-1] != "colour", question
            if question.startswith("How many"):
                named = (words[2], words[3][:-1])
                assert scenes.NUMBERS.index(answer) == looks.count(named)
            elif question.startswith("Is there"):
                named = (words[3], words[4])
                assert (answer == "yes") == (named in looks)
            else:
                named = (words[2], words[3])
                [figure] = [f for f in figures if (f.color, f.kind) == named]
                assert answer in (("left" if figure.x < 112 else "right"), ("top" if figure.y < 112 else "bottom"))
            shown = scenes.evidence(question, labels)
            assert shown.any() == (named in looks), question
            colour_of, kind_of = (labels - 1) // 3, (labels - 1) % 3
            assert (colour_of[shown] == list(scenes.COLORS).index(named[0])).all()
            assert (kind_of[shown] == scenes.KINDS.index(named[1])).all()
    assert set(kinds) == {"count", "exists", "side", "height"} and min(kinds.count(k) for k in set(kinds)) > 0.15 * len(kinds)

    from trimcpp.quality.minivlm.__main__ import main as minivlm

    minivlm(["split", "--data", str(tmp_path / "c"), "--images", "3", "--style", "crowded"])
    assert json.loads((tmp_path / "c" / "split.json").read_text()) == {
        "seed": SEEDS["test"], "images": 3, "size": MINI.image_size, "per_image": 2, "style": "crowded"}
    assert [(q.question, q.answer) for q in load(tmp_path / "c")] == [
        qa for _, _, pairs in scenes.split(SEEDS["test"], 3, per_image=2, style="crowded") for qa in pairs]


def test_training_styles():
    """Each stage's training scenes: stage 6 draws exactly as before crowded scenes existed (one draw,
    cluttered below 0.5), stage 7 mixes all three, stages 1-5 draw nothing; rebuild stops at the
    bundled stage."""
    from trimcpp.quality.minivlm.stages import BUNDLED_STAGE, STAGES

    a, b = np.random.default_rng(1), np.random.default_rng(1)
    six = [STAGES["stage6"].style(a) for _ in range(200)]
    assert six == ["cluttered" if b.random() < 0.5 else "plain" for _ in range(200)]
    seven = [STAGES["stage7"].style(a) for _ in range(2000)]
    assert 0.35 < seven.count("crowded") / 2000 < 0.45 and 0.25 < seven.count("cluttered") / 2000 < 0.35
    state = a.bit_generator.state
    assert STAGES["stage1"].style(a) == "plain" and a.bit_generator.state == state
    assert STAGES["stage7"].styles() == ("plain", "cluttered", "crowded") and STAGES["stage5"].styles() == ("plain",)
    assert BUNDLED_STAGE == "stage6" and list(STAGES).index(BUNDLED_STAGE) == len(STAGES) - 2


def test_agreement_against_every_row(capsys, models, tmp_path):
    """`trimcpp eval --agreement` on a dataset without answers: keep-all agrees with itself, a keep
    >= the rows agrees fully, and each cell is the share of the handler's own replies that equal
    keep-all's (counted here); the table names the share and the speed-up."""
    llm, mmproj = models["llm"], models["1.5"]
    folder = scenes.write_split(tmp_path / "data", seed=4, images=3, size=84, per_image=2)
    records = json.loads((folder / "questions.json").read_text())
    for r in records:
        del r["answer"]
    (folder / "questions.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="needs string fields image, question and answer"):
        load(folder)
    handler = TrimLlava15ChatHandler(clip_model_path=mmproj, keep=None, verbose=False, reuse_kv=False)  # as eval
    threads = os.cpu_count()
    llama = Llama(model_path=llm, chat_handler=handler, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                  verbose=False, seed=0)

    def replies(method, keep):
        handler.method, handler.keep = method, keep
        return [(llama.create_chat_completion(messages=image_messages((folder / r["image"]).read_bytes(), r["question"]),
                                              max_tokens=6, temperature=0.0)["choices"][0]["message"]["content"] or "").strip()
                for r in records]

    every = replies("none", None)
    expected = {(m, k): np.mean([a == b for a, b in zip(replies(m, k), every)]) for m in ("uniform", "cdpruner")
                for k in (36, 2)}
    assert min(expected.values()) < 1.0  # 2 of 36 rows change some reply: the share can be wrong

    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--methods", "uniform,cdpruner",
                 "--keep", "36,2", "--agreement", "--max-tokens", "6", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["methods"] == ["none", "uniform", "cdpruner"]
    cells = {(r["method"], r["keep"]): r for r in result["results"]}
    assert cells[("none", None)]["agreement"] == 1.0 and cells[("none", None)]["accuracy"] is None
    for config, share in expected.items():
        assert cells[config]["agreement"] == pytest.approx(share), config
        assert cells[config]["seconds"] > 0 and cells[config]["mean_kept"] == min(config[1], 36)
    with pytest.raises(SystemExit):
        main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--agreement", "--max-tokens", "0"])
    capsys.readouterr()
    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--methods", "cdpruner",
                 "--keep", "2", "--agreement"])
    out = capsys.readouterr().out
    assert code == 0 and "accuracy" not in out and "the same as with every row" in out
    row = next(line for line in out.splitlines() if line.startswith("cdpruner")).split()
    assert row[1] == f"{100 * expected[('cdpruner', 2)]:.1f}%" and row[2].endswith("x")


def test_the_bundled_split_is_the_plain_test_split():
    """The scene generator still draws the bundled pictures' questions (the styles added since must not
    have moved a random draw of the plain style)."""
    from trimcpp.quality.minivlm.stages import SEEDS

    assert [(q.question, q.answer) for q in load(BUNDLED["data"])] == [
        qa for _, _, pairs in scenes.split(SEEDS["test"], 200, per_image=2) for qa in pairs]


def test_agreement_on_the_bundled_model(capsys):
    """The defaults (the bundled mini VLM and its test split, which has answers): accuracy and agreement;
    keep-all agrees with itself; 256 of 256 rows is keep-all again; 2 rows change some replies."""
    code = main(["eval", "--agreement", "--limit", "6", "--keep", "256,2", "--methods", "cdpruner", "--json"])
    result = json.loads(capsys.readouterr().out)
    cells = {(r["method"], r["keep"]): r for r in result["results"]}
    assert code == 0 and result["methods"] == ["none", "cdpruner"] and cells[("none", None)]["accuracy"] is not None
    assert cells[("none", None)]["agreement"] == cells[("cdpruner", 256)]["agreement"] == 1.0
    assert cells[("cdpruner", 256)]["replies"] == cells[("none", None)]["replies"]
    assert cells[("cdpruner", 2)]["agreement"] < 1.0 and cells[("cdpruner", 2)]["mean_kept"] == 2


def test_agreement_reads_unlabelled_pope_and_mmbench(tmp_path):
    (tmp_path / "a.png").write_bytes(_picture(1))
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "text": "Is there a cat?"}) + "\n")
    with pytest.raises(ValueError, match="needs string fields"):
        load(tmp_path / "q.jsonl")
    [q] = load(tmp_path / "q.jsonl", answers=False)
    assert q.question == "Is there a cat?" and q.answer is None
    (tmp_path / "e.jsonl").write_text(json.dumps({"image": "a.png", "text": "Is there a cat?", "label": ""}) + "\n")
    assert load(tmp_path / "e.jsonl", answers=False)[0].answer == ""  # an empty answer is an answer
    import base64

    picture = base64.b64encode(_picture(2)).decode()
    (tmp_path / "m.tsv").write_text("index\tquestion\tA\tB\timage\n0\tWhich?\tcat\tdog\t" + picture + "\n")
    with pytest.raises(ValueError, match="no column answer"):
        load(tmp_path / "m.tsv")
    [q] = load(tmp_path / "m.tsv", answers=False)
    assert q.answer is None and "A. cat" in q.question
