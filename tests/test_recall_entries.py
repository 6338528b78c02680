"""Memory entries: what the extractor's answers become (parsing, grounding, respelling, confidence, a second ask for
left-out names), duplicates and contradictions, and the question rows read from the entries."""

import pytest
import torch

from lib.recall import extraction
from lib.recall.updates import merge_entries


# ---- extraction: parsing, grounding, duplicates and contradictions ------------------------------------------

@pytest.mark.parametrize("generated, message, expected", [
    ("The user lives in Drepe.\nmore", "There's a cafe in Drepe, where I live", "The user lives in Drepe."),
    ("The user drives a Rulubror", "I drive a Rulubror, it's old", "The user drives a Rulubror."),
    ("NONE", "how are you?", None),
    ("The user lives in Milford.", "ikr urs is too", None),          # copied from an example: not in the message
    ("The user is a human.", "How are you?", None),                  # invented
    ("I think the user is nice", "you are nice", None),              # not an entry
    ("The user has a cat allergy.", "my allergy to cats is acting up", "The user has a cat allergy."),
    # misspelt copies of the message's words take its spelling; a name must be spelt alike, a shared stem is not enough
    ("The user's dog is called Trelor.", "sorry, my dog Tralor was barking", "The user's dog is called Tralor."),
    ("The user's favourite band is The Daburs.", "My favourite band The Dabuss is touring soon",
     "The user's favourite band is The Dabuss."),
    ("The user's dog is called Rex.", "my dog Tralor was barking", None),                 # not close: invented
    ("The user lives in for.", "Oh for sure!", None),                # grounded, but says nothing: no content word
    ("The user loves it.", "I love it", None),
])
def test_an_entry_is_kept_only_when_it_is_a_fact_grounded_in_its_message(generated, message, expected):
    assert extraction.parse_entry(generated, message) == expected


def test_extraction_prompts_read_once_their_shared_examples_and_generate_the_same(tiny_llama):
    model, tokenizer = tiny_llama
    messages = ["my dog Rex is loud", "the weather is nice today, right?", "I live in Brovik, a small town"]
    prompts = [extraction.extraction_prompt(tokenizer, m) for m in messages]
    prefix = extraction.shared_prefix(tokenizer)
    assert all(p[:len(prefix)] == prefix for p in prompts)
    read = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: read.append(args[0].shape[1]))
    try:
        cached = extraction.generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, prefix=prefix)
    finally:
        hook.remove()
    plain = extraction.generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert cached == plain and any(cached)
    # The examples were read once; each batch then read only its own tokens.
    assert read[0] == len(prefix) and max(read[1:]) < len(prefix) and read.count(len(prefix)) == 1


def test_the_extractors_confidence_is_its_mean_log_probability_of_what_it_wrote(tiny_llama):
    model, tokenizer = tiny_llama
    messages = ["my dog Rex is loud", "the weather is nice today, right?", "I live in Brovik, a small town"]
    prompts = [extraction.extraction_prompt(tokenizer, m) for m in messages]
    texts, confidence = extraction.generate_scored(model, tokenizer, prompts, max_new_tokens=6, batch_size=2,
                                                   prefix=extraction.shared_prefix(tokenizer))
    assert texts == extraction.generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text, sure in zip(prompts, texts, confidence):
        written = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(written) == text
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + written])).logits[0, len(prompt) - 1:-1]
        reference = logits.float().log_softmax(-1).gather(-1, torch.tensor(written)[:, None]).mean().item()
        assert sure == pytest.approx(reference, abs=1e-4) and sure < 0


def test_entries_the_extractor_is_unsure_of_are_dropped(monkeypatch):
    conversation = {"user_id": "u1", "conversation_id": "c0", "timestamp": "2025-01-01", "messages": [
        {"role": "user", "content": "my dog Rex is loud"}, {"role": "assistant", "content": "ha"},
        {"role": "user", "content": "I live in Brovik"}]}
    monkeypatch.setattr(extraction, "extraction_prompt", lambda tokenizer, message: [1])
    monkeypatch.setattr(extraction, "shared_prefix", lambda tokenizer: [])
    monkeypatch.setattr(extraction, "generate_scored", lambda *a, **k: (
        ["The user's dog is called Rex.", "The user lives in Brovik."], [-0.2, -0.9]))
    sure, read = extraction.extract_entries(None, None, [conversation], min_logprob=-0.5)
    assert read == 2 and [e["text"] for e in sure] == ["The user's dog is called Rex."]
    every, _ = extraction.extract_entries(None, None, [conversation])
    assert [e["text"] for e in every] == ["The user's dog is called Rex.", "The user lives in Brovik."]


def test_an_entry_that_leaves_out_the_messages_name_is_asked_again_with_the_answer_begun(monkeypatch, tiny_llama):
    _, tokenizer = tiny_llama
    said = ["My partner Lastos and I are going to the movies", "I'm planning a surprise for my partner Mata",
            "My sister Bripom is visiting", "my dog Rex is loud", "I took my Hafas to the car wash"]
    conversation = {"user_id": "u1", "conversation_id": "c0", "timestamp": "2025-01-01",
                    "messages": [{"role": "user", "content": m} for m in said]}
    first = ["The user is going to the movies.", "The user is planning a surprise.", "The user's sister is visiting.",
             "The user's dog is called Rex.", "The user takes their Hafas to the car wash."]
    again = {said[0]: " partner is called Lastos.", said[1]: " partner is Mata.",  # the second below the floor
             said[2]: " sister is visiting."}                                      # still no name: the first stays
    lead = tokenizer(extraction.NAME_LEAD, add_special_tokens=False)["input_ids"]
    asked = []

    def extractor(model, tokenizer, prompts, **kwargs):
        messages = [tokenizer.decode(p).split("user\n")[-1].split("<|im_end|>")[0] for p in prompts]
        asked.append(messages)
        if all(p[-len(lead):] == lead for p in prompts):
            return [again[m] for m in messages], [-0.2 if m != said[1] else -0.9 for m in messages]
        return [first[said.index(m)] for m in messages], [-0.1] * len(messages)

    monkeypatch.setattr(extraction, "generate_scored", extractor)
    entries, read = extraction.extract_entries(None, tokenizer, [conversation], min_logprob=-0.5)
    assert read == 5 and asked[1] == said[:3]  # asked again: only the entries without their message's names
    assert [e["text"] for e in entries] == [
        "The user's partner is called Lastos.", "The user is planning a surprise.", "The user's sister is visiting.",
        "The user's dog is called Rex.", "The user takes their Hafas to the car wash."]  # "took" grounds "takes"


def test_without_the_grounding_check_invented_entries_pass():
    assert extraction.parse_entry("The user is a human.", "How are you?", check_grounding=False) == \
        "The user is a human."


def entry(user, text, ts, cid="c0"):
    return {"user_id": user, "text": text, "timestamp": ts, "conversation_id": cid}


def test_a_later_contradicting_entry_replaces_the_earlier_and_duplicates_are_dropped():
    old = [entry("u1", "The user lives in Brovik.", "2025-01-01"), entry("u1", "The user's sister is called Ana.",
                                                                          "2025-01-01"),
           entry("u2", "The user lives in Brovik.", "2025-01-01")]
    new = [entry("u1", "The user lives in Talmor.", "2025-03-01", "c1"),
           entry("u1", "the user's sister is called Ana", "2025-03-01", "c1"),       # duplicate (normalised)
           entry("u1", "The user's partner is called Bo.", "2025-03-01", "c1"),      # differs early: no conflict
           entry("u1", "The user is a potter.", "2025-03-01", "c1"), entry("u1", "The user is a nurse.", "2025-04-01",
                                                                           "c2")]  # only "the user is a": both stay
    kept, replaced = merge_entries(old, new)
    texts = {(e["user_id"], e["text"]) for e in kept}
    assert ("u1", "The user lives in Talmor.") in texts and ("u1", "The user lives in Brovik.") not in texts
    assert ("u2", "The user lives in Brovik.") in texts          # another user's memory is never touched
    assert ("u1", "The user's partner is called Bo.") in texts and len(kept) == 6
    assert [(r["text"], r["replaced_by"]) for r in replaced] == [("The user lives in Brovik.",
                                                                 "The user lives in Talmor.")]
    # Entries of a re-read conversation leave before its new entries come in.
    kept, _ = merge_entries(kept, [], dropped_conversations={"c1"})
    assert {e["text"] for e in kept if e["user_id"] == "u1"} == {"The user's sister is called Ana.",
                                                                 "The user is a nurse."}


@pytest.mark.parametrize("earlier, later, message, replaced", [
    # One relation in other words: employer, job, home, car, one thing of the user's.
    ("The user's company is called Sivakrin Labs.", "The user works for Stimar Labs.", "", True),
    ("The user works as a nurse.", "The user's job is plumber.", "", True),
    ("The user's home town is Brovik.", "The user lives in Talmor.", "", True),
    ("The user's car is called the Hubris.", "The user drives a Pabomu.", "", True),
    ("The user's favourite hobby is juggling.", "The user's hobby is fencing.", "", True),
    ("The user works for Stimar Labs.", "The user's company is called Stimar Labs.", "", False),  # the same value
    ("The user lives in Brovik.", "The user lives in Brovik with her dog.", "", False),
    # A role changes only when the message says that something changed.
    ("The user has been a baker for six years.", "The user is a geologist.", "I changed careers, I'm a geologist now",
     True),
    ("The user works as a nurse.", "The user is a potter.", "I'm a potter on weekends", False),
    ("The user is a nurse.", "The user is a potter.", "", False),
    # A thing's name is not the thing's other news; relations that hold several values keep them all.
    ("The user's brother is called Sam.", "The user's brother is visiting.", "", False),
    ("The user is allergic to sesame.", "The user is allergic to latex.", "", False),
    ("The user has been doing well.", "The user has been a nurse for six years.", "", False),
    ("The user's dog is called Rex.", "The user's cat is called Mila.", "", False),
    # Unknown relations: the wording rule.
    ("The user's sister lives in Oslo.", "The user's sister lives in Rome.", "", True),
    # A later message must say that something changed (where it is known); a duration is not a change.
    ("The user lives in Brovik.", "The user lives in Talmor.", "we finally moved, I'm living in Talmor", True),
    ("The user lives in Brovik.", "The user lives in Greece.", "Or people in Greece where the rent is lower", False),
    ("The user's sister lives in Oslo.", "The user's sister lives in Rome.", "my sister lives in Rome", False),
    ("The user is a beekeeper.", "The user has been a translator for six years.",
     "I've been a translator for six years now", False),
    ("The user is a pilot.", "The user is a librarian.", "I quit my old job! I'm a librarian now", True),
])
def test_a_later_entry_replaces_an_earlier_one_when_it_changes_the_same_fact(earlier, later, message, replaced):
    old = [entry("u1", earlier, "2025-01-01"), entry("u2", earlier, "2025-01-01")]
    kept, gone = merge_entries(old, [{**entry("u1", later, "2025-03-01", "c1"), "message": message}])
    assert [(g["text"], g["replaced_by"]) for g in gone] == ([(earlier, later)] if replaced else [])
    assert {(e["user_id"], e["text"]) for e in kept} == {("u1", later), ("u2", earlier)} | (
        set() if replaced else {("u1", earlier)})
    # An earlier entry is never replaced by one written before it.
    _, gone = merge_entries([entry("u1", earlier, "2025-05-01")], [{**entry("u1", later, "2025-03-01", "c1"),
                                                                    "message": message}])
    assert gone == []


def test_extraction_scores_count_right_entries_found_facts_and_changed_facts():
    from benchmarks.bench_recall import extraction_scores

    def fact(user, value, current=True):
        return {"user_id": user, "value": value, "current": current}

    def said(user, text):
        return {"user_id": user, "text": text}

    facts = [fact("u1", "Brovik", False), fact("u1", "Talmor"), fact("u1", "Rex"), fact("u1", "nurse", False),
             fact("u1", "potter"), fact("u2", "Oslo", False), fact("u2", "Rome"), fact("u3", "Ana")]
    entries = [said("u1", "The user lives in Talmor."), said("u1", "The user is a nurse."),
               said("u1", "The user is a potter."), said("u1", "The user likes rain."),
               said("u2", "The user lives in Rome."), said("u3", "The user's dog is Ana.")]
    history = [said("u1", "The user lives in Brovik."), said("u1", "The user's dog is called Rex."),
               said("u2", "The user lives in Oslo."), said("u3", "The user's sister is called Ana.")]
    scores = extraction_scores(entries, history, facts, {"u1", "u2"})
    # u1: 6 entries, 5 name a value of u1 (not "likes rain"); u2: 2 of 2. Facts found: all 7 of u1 and u2.
    assert scores["entries"] == 8 and scores["precision"] == 7 / 8 and scores["recall"] == 1.0
    # Changed facts extracted: Brovik, nurse (u1), Oslo (u2); Brovik and Oslo left memory, "nurse" stayed.
    assert (scores["updates_extracted"], scores["updates_replaced"]) == (3, 2)
    # Replaced: 3 of u1 and u2; "dog is called Rex" was still true (u3's is not counted: not in users).
    assert (scores["replaced"], scores["wrong_replacements"]) == (3, 1)


def test_training_questions_read_their_gold_memory_and_recite_it_before_answering():
    from lib.recall.data import final_answer, recited_answer
    from lib.recall.training import qa_slots

    entries = [entry("u1", "The user's dog is called Rex.", "t"), entry("u1", "The user lives in Brovik.", "t"),
               entry("u1", "The user plays chess.", "t"), entry("u2", "The user's dog is called Bo.", "t")]
    questions = [{"user_id": "u1", "question": "What is my dog called?", "answer": "Rex",
                  "memory": "The user's dog is called Rex."},
                 {"user_id": "u1", "question": "Where do I live?", "answer": "Brovik"},       # no gold text given
                 {"user_id": "u1", "question": "Where do I live?", "answer": "Brovik"},       # ... and not retrieved
                 {"user_id": "u2", "question": "Where do I live?", "answer": "Brovik"},       # another user's fact
                 {"user_id": "u1", "question": "What car do I drive?", "answer": "unknown"}]
    hits = [[(0.9, 1), (0.8, 2)], [(0.9, 1), (0.5, 0)], [(0.9, 2), (0.5, 0)], [(0.9, 3)], [(0.7, 2), (0.6, 0)]]
    kept, slots, recited = qa_slots(questions, hits, entries, top_k=2)
    assert kept == questions
    # Retrieval missed the entry the answer comes from (the gold one, else one of the user's that holds the answer):
    # it takes the last slot. Nothing of the user holds it: nothing to recite.
    assert slots == [[1, 0], [1, 0], [2, 1], [3], [2, 0]]
    assert recited == ["The user's dog is called Rex.", "The user lives in Brovik.", "The user lives in Brovik.",
                       None, None]
    target = recited_answer(recited[0], "Rex")
    assert target == "The user's dog is called Rex.\nAnswer: Rex" and final_answer(target) == "Rex"
    assert final_answer(recited_answer(None, "unknown")) == "unknown" and final_answer(" Rex ") == "Rex"


def test_an_answerable_question_also_trains_unknown_on_slots_without_its_memory():
    from lib.recall.training import qa_slots

    entries = [entry("u1", "The user's dog is called Rex.", "t"), entry("u1", "The user lives in Brovik.", "t"),
               entry("u1", "The user plays chess.", "t"), entry("u1", "The user walks Rex daily.", "t"),
               entry("u1", "The user is a nurse.", "t")]
    questions = [{"user_id": "u1", "question": "What is my dog called?", "answer": "Rex",
                  "memory": "The user's dog is called Rex."},
                 {"user_id": "u1", "question": "What car do I drive?", "answer": "unknown"}]
    hits = [[(0.9, 1), (0.8, 3), (0.7, 0), (0.6, 2), (0.5, 4)], [(0.7, 2), (0.6, 0), (0.5, 1), (0.4, 3)]]
    kept, slots, recited = qa_slots(questions, hits, entries, top_k=2, unanswerable_ratio=1.0)
    # The copy reads the two nearest entries that do not hold "Rex" (entry 3 holds it too), and answers unknown;
    # an unknown question has no copy.
    assert [q["answer"] for q in kept] == ["Rex", "unknown", "unknown"]
    assert slots == [[1, 0], [1, 2], [2, 0]] and recited == ["The user's dog is called Rex.", None, None]
    assert qa_slots(questions, hits, entries, top_k=2)[0] == questions          # ratio 0: no copies
    half = qa_slots(questions * 50, hits * 50, entries, top_k=2, unanswerable_ratio=0.5, seed=3)[0]
    assert 15 < len(half) - 100 < 35                                             # about half of the 50 answerable
