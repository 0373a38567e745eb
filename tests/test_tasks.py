import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ray_scout.core.evaluation.tasks import (
    TASKS, Sample, TaskDataError, approx_tokens, dump_jsonl, generate, load_jsonl, load_squad,
)

DATA = Path(__file__).parent / "data"
VARIANTS = [("single_needle", {}), ("multi_needle", {}), ("multi_needle", {"num_needles": 8}),
            ("multi_hop", {}), ("multi_hop", {"hops": 3})]


def _within_tolerance(measured: int, target: int) -> bool:
    return abs(measured - target) <= max(0.02 * target, 4)


# ------------------------------------------------------------------ Sample


def test_sample_is_frozen_and_stores_answers_as_a_tuple():
    sample = Sample("s1", "ctx", "q?", ["a", "b"], "t")
    assert sample.answers == ("a", "b") and sample.answerable
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.context = "other"
    assert not Sample("s2", "ctx", "q?", (), "t").answerable


def test_sample_rejects_a_bare_string_as_answers():
    with pytest.raises(TypeError, match="wrap a single answer"):
        Sample("s1", "ctx", "q?", "a", "t")


# ------------------------------------------------------------------ synthetic generator


def _check_invariants(sample: Sample) -> None:
    context, answer = sample.context, sample.answers[0]
    start, end = sample.meta["answer_span"]
    assert context[start:end] == answer
    # Exactly once: neither filler nor distractors carry the answer.
    assert len(re.findall(rf"\b{re.escape(answer)}\b", context, flags=re.IGNORECASE)) == 1
    spans = list(sample.meta["needle_spans"]) + list(sample.meta["distractor_spans"])
    for left, right in spans:
        sentence = context[left:right]
        assert sentence.endswith(".") and sentence[0].isupper()
        assert "\n" not in sentence
    assert len(set(spans)) == len(spans)
    last_start, last_end = sample.meta["needle_spans"][-1]
    assert last_start <= start < end <= last_end


@pytest.mark.parametrize("task, options", VARIANTS)
def test_generated_samples_hold_the_answer_once_inside_the_recorded_needle(task, options):
    for sample in generate(task, 8, context_tokens=600, seed=11, **options):
        _check_invariants(sample)
        assert sample.task == task


@pytest.mark.parametrize("task, options", VARIANTS)
@pytest.mark.parametrize("context_tokens", [300, 1000, 4000])
def test_context_length_hits_the_target_with_the_default_counter(task, options, context_tokens):
    for sample in generate(task, 3, context_tokens=context_tokens, seed=2, **options):
        assert sample.meta["context_tokens"] == approx_tokens(sample.context)
        assert _within_tolerance(sample.meta["context_tokens"], context_tokens)


def test_a_custom_token_counter_sets_the_length():
    def four_chars_per_token(text: str) -> int:
        return len(text) // 4

    for sample in generate("multi_hop", 3, context_tokens=800, seed=0,
                           count_tokens=four_chars_per_token):
        assert _within_tolerance(len(sample.context) // 4, 800)
        assert sample.meta["token_counter"] == "four_chars_per_token"


@pytest.mark.model
@pytest.mark.parametrize("task, options", VARIANTS)
def test_context_length_hits_the_target_with_the_embedded_tokenizer(task, options):
    from transformers import AutoTokenizer

    from ray_scout.core.llm.models import embedded_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint())
    for context_tokens in (300, 1000, 4000):
        for sample in generate(task, 2, context_tokens=context_tokens, seed=5,
                               count_tokens=tokenizer, **options):
            measured = len(tokenizer(sample.context, add_special_tokens=False)["input_ids"])
            assert _within_tolerance(measured, context_tokens)


def test_generation_is_deterministic_and_sample_i_does_not_depend_on_n():
    first = generate("multi_needle", 5, context_tokens=400, seed=9)
    assert first == generate("multi_needle", 5, context_tokens=400, seed=9)
    assert first[:2] == generate("multi_needle", 2, context_tokens=400, seed=9)
    assert first[0].context != generate("multi_needle", 1, context_tokens=400, seed=10)[0].context
    assert len({sample.sample_id for sample in first}) == 5


def test_filler_is_varied_not_one_repeated_line():
    context = generate("single_needle", 1, context_tokens=3000, seed=1)[0].context
    sentences = [s for s in re.split(r"(?<=\.)\s+", context) if s]
    assert len(sentences) > 100
    assert len(set(sentences)) / len(sentences) > 0.8


def test_needles_land_at_varied_depths():
    depths = [s.meta["depth"] for s in generate("single_needle", 30, context_tokens=500, seed=3)]
    assert min(depths) < 0.25 and max(depths) > 0.75


def test_multi_needle_asks_about_exactly_one_of_several_same_form_facts():
    for sample in generate("multi_needle", 10, context_tokens=800, seed=4, num_needles=5):
        facts = [sample.context[a:b] for a, b in
                 sample.meta["needle_spans"] + sample.meta["distractor_spans"]]
        assert len(facts) == 5
        shapes = {re.sub(r"[A-Z][a-z]+|\d+|[a-z]+(?=\.$)", "X", fact) for fact in facts}
        assert len(shapes) == 1, shapes
        key = re.search(r"(?:for the|of|was) (.+?)(?: project| born)?\?$", sample.question)[1]
        assert [key in fact for fact in facts].count(True) == 1


@pytest.mark.parametrize("hops", [2, 3])
def test_multi_hop_chain_leads_from_the_question_to_the_answer(hops):
    for sample in generate("multi_hop", 10, context_tokens=900, seed=6, hops=hops):
        assert sample.meta["hops"] == hops
        chain = [sample.context[a:b] for a, b in sample.meta["needle_spans"]]
        distractors = [sample.context[a:b] for a, b in sample.meta["distractor_spans"]]
        assert len(chain) == hops and len(distractors) == 3 * hops
        person = re.search(r"organization (?:that )?(.+?)(?:'s manager)? works for",
                           sample.question)[1]
        # Follow the chain by entity names, using every fact in the context.
        facts = chain + distractors
        if hops == 3:
            (link,) = [f for f in facts if f.startswith(person + " reports directly to ")]
            person = link.removeprefix(person + " reports directly to ").rstrip(".")
        (employment,) = [f for f in facts if f.startswith(person + " works for ")]
        org = employment.removeprefix(person + " works for ").rstrip(".")
        (headquarters,) = [f for f in facts if f.lower().startswith(org.lower() + " has its")]
        assert headquarters.endswith(f" in {sample.answers[0]}.")
        assert headquarters in chain


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(VARIANTS), st.integers(0, 10_000), st.integers(250, 2500))
def test_every_generated_sample_keeps_its_invariants(variant, seed, context_tokens):
    task, options = variant
    (sample,) = generate(task, 1, context_tokens=context_tokens, seed=seed, **options)
    _check_invariants(sample)
    assert _within_tolerance(approx_tokens(sample.context), context_tokens)


def test_registry_lists_the_three_task_families():
    assert set(TASKS) == {"single_needle", "multi_needle", "multi_hop"}


@pytest.mark.parametrize("call, message", [
    (lambda: generate("needle", 1, context_tokens=500), "known tasks: multi_hop"),
    (lambda: generate("single_needle", 1, context_tokens=500, hops=2), "does not take hops"),
    (lambda: generate("multi_hop", 1, context_tokens=500, hops=4), "hops=2 or hops=3"),
    (lambda: generate("multi_hop", 1, context_tokens=60, hops=3), "ask for at least"),
    (lambda: generate("single_needle", 1, context_tokens=500, count_tokens=3), "callable"),
])
def test_bad_generator_arguments_say_what_to_do(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ------------------------------------------------------------------ loaders


def test_load_squad_reads_answerable_and_unanswerable_questions():
    samples = load_squad(DATA / "squad_v2_sample.json")
    assert [s.sample_id for s in samples] == ["ht-001", "ht-002", "ht-003", "ht-004",
                                              "ob-001", "ob-002"]
    by_id = {s.sample_id: s for s in samples}
    assert by_id["ht-001"].answers == ("1642", "in 1642")
    assert by_id["ht-003"].answers == () and not by_id["ht-003"].answerable
    assert by_id["ob-001"].meta["title"] == "Observatory"
    for sample in samples:
        for answer, start in zip(sample.answers, sample.meta["answer_starts"]):
            assert sample.context[start:start + len(answer)] == answer
    assert len(load_squad(DATA / "squad_v2_sample.json", limit=4)) == 4


def _squad_file(tmp_path: Path, qa: dict) -> Path:
    path = tmp_path / "broken.json"
    document = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [qa]}]}]}
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("qa, message", [
    ({"id": "x", "answers": [{"text": "c"}]}, r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'"),
    ({"id": "x", "question": "q", "answers": [], "is_impossible": False},
     "no answers; add answers or set is_impossible"),
    ({"id": "x", "question": "q", "answers": [{"answer_start": 0}]},
     r"answers\[0\]: missing field 'text'"),
    ({"id": "x", "question": "q", "answers": "c"}, "'answers' must be a list"),
])
def test_load_squad_names_the_file_place_and_field_of_bad_records(tmp_path, qa, message):
    path = _squad_file(tmp_path, qa)
    with pytest.raises(TaskDataError, match=message) as error:
        load_squad(path)
    assert str(path) in str(error.value)


def test_load_squad_reports_the_line_of_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n  {"title": "t",,}\n]}')
    with pytest.raises(TaskDataError, match="line 2"):
        load_squad(path)
    with pytest.raises(TaskDataError, match="no such file"):
        load_squad(tmp_path / "missing.json")


def test_load_jsonl_reads_lists_strings_and_extra_fields():
    samples = load_jsonl(DATA / "qa_sample.jsonl")
    assert [s.sample_id for s in samples] == ["q1", "qa_sample-2", "q3"]
    assert samples[0].answers == ("seven", "at seven")
    assert samples[1].answers == ("three",) and samples[1].meta == {"source": "handwritten"}
    assert samples[2].answers == () and samples[2].task == "handwritten"
    assert samples[2].meta == {"difficulty": "unanswerable"}
    assert samples[0].task == "jsonl"
    assert len(load_jsonl(DATA / "qa_sample.jsonl", limit=1)) == 1


@pytest.mark.parametrize("line, message", [
    ('{"context": "c", "answers": ["a"]}', "missing field 'question'"),
    ('{"context": "c", "question": "q"}', "missing field 'answers'"),
    ('{"context": "c", "question": "q", "answers": [1]}', "string or a list of strings"),
    ('{"context": "c", "question": "q", "answers": [], "meta": 3}', "'meta' must be an object"),
    ('{"context": "c", "question": 5, "answers": []}', "'question' must be a string"),
    ('{"context": "c", ', "not valid JSON"),
    ('["c", "q", "a"]', "expected a JSON object"),
])
def test_load_jsonl_names_the_file_line_and_field_of_bad_records(tmp_path, line, message):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"context": "c", "question": "q", "answers": "a"}\n\n' + line + "\n")
    with pytest.raises(TaskDataError, match=message) as error:
        load_jsonl(path)
    assert f"{path}:3" in str(error.value)


def test_generated_samples_survive_a_jsonl_round_trip(tmp_path):
    samples = generate("multi_hop", 3, context_tokens=300, seed=1, hops=3)
    dump_jsonl(samples, tmp_path / "set.jsonl")
    loaded = load_jsonl(tmp_path / "set.jsonl")
    for original, back in zip(samples, loaded, strict=True):
        assert (back.sample_id, back.context, back.question, back.answers, back.task) == (
            original.sample_id, original.context, original.question, original.answers,
            original.task)
        assert back.meta["needle_spans"] == [list(s) for s in original.meta["needle_spans"]]


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_text, _text, st.lists(_text, max_size=3)), min_size=1, max_size=5))
@example([("line\u2028separator\x85inside", "q\r", ["a"])])  # JSON leaves these unescaped
def test_load_jsonl_reads_back_whatever_was_written(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("jsonl") / "records.jsonl"
    samples = [Sample(f"id{i}", context, question, tuple(dict.fromkeys(answers)), "jsonl")
               for i, (context, question, answers) in enumerate(records)]
    dump_jsonl(samples, path)
    assert load_jsonl(path) == samples
