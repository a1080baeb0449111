"""Retrieval recall@k and zero-shot accuracy against a brute-force sort in Python, ties broken
against the model, prompts and prompt ensembling, clear errors."""

import itertools

import numpy as np
import pytest

from navit_seq.evaluation import retrieval


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force_rank(scores: list[float], positive: list[bool]) -> int:
    """1-based rank of the first correct candidate after a stable sort by score (high first)
    in which, at equal scores, wrong candidates come first."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], positive[j]))
    return next(rank for rank, j in enumerate(order, start=1) if positive[j])


def brute_force_recalls(images, texts, text_image, ks):
    results = {}
    image_ranks = []
    for i, image in enumerate(images):
        positive = [int(t) == i for t in text_image]
        if any(positive):
            image_ranks.append(brute_force_rank([float(image @ t) for t in texts], positive))
    text_ranks = [
        brute_force_rank([float(text @ image) for image in images],
                         [i == text_image[j] for i in range(len(images))])
        for j, text in enumerate(texts)
    ]  # fmt: skip
    for k in ks:
        results[f"image_to_text/recall@{k}"] = np.mean([r <= k for r in image_ranks])
        results[f"text_to_image/recall@{k}"] = np.mean([r <= k for r in text_ranks])
    return results


@pytest.fixture(scope="module")
def pairs():
    """30 images (the last 3 without captions), 1-3 captions each, noisy aligned embeddings."""
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(30, 8)))
    text_image = np.concatenate([np.repeat(i, 1 + i % 3) for i in range(27)])
    texts = unit(images[text_image] + 0.8 * rng.normal(size=(len(text_image), 8)))
    return images, texts, text_image


def test_recalls_match_brute_force_sorting(pairs):
    images, texts, text_image = pairs
    got = retrieval.retrieval_recall(images, texts, text_image)
    expected = brute_force_recalls(images, texts, text_image, retrieval.RECALL_KS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < got["image_to_text/recall@1"] < got["image_to_text/recall@10"] < 1
    assert got["images_without_text"] == 3 and got["num_texts"] == len(text_image)


def test_small_chunks_give_the_same_ranks(pairs):
    images, texts, text_image = pairs
    positives = lambda a, b: np.arange(len(images))[None, :] == text_image[a:b, None]
    whole = retrieval.best_positive_ranks(texts, images, positives)
    chunked = retrieval.best_positive_ranks(texts, images, positives, chunk_size=7)
    np.testing.assert_array_equal(whole, chunked)


def test_identical_embeddings_rank_every_wrong_candidate_first():
    images = np.ones((4, 3)) / np.sqrt(3)
    texts = np.ones((8, 3)) / np.sqrt(3)
    text_image = np.repeat(np.arange(4), 2)
    got = retrieval.retrieval_recall(images, texts, text_image)
    # image -> text: 6 wrong captions tie with the best right one, rank 7.
    assert [got[f"image_to_text/recall@{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]
    # text -> image: 3 wrong images tie, rank 4.
    assert [got[f"text_to_image/recall@{k}"] for k in (1, 5, 10)] == [0.0, 1.0, 1.0]


def test_exact_tie_between_right_and_wrong_candidate_is_a_miss_at_1():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 are equal
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = retrieval.retrieval_recall(images, texts, np.array([0, 2]), ks=(1, 2))
    assert got["text_to_image/recall@1"] == 0.5  # caption 0 ties images 0 and 1
    assert got["text_to_image/recall@2"] == 1.0


def test_perfect_embeddings_reach_recall_one(pairs):
    images, _, text_image = pairs
    got = retrieval.retrieval_recall(images, images[text_image], text_image, ks=(1,))
    assert got["text_to_image/recall@1"] == 1.0
    # Several captions of an image are equal; the best one is still first.
    assert got["image_to_text/recall@1"] == 1.0


def test_zero_shot_accuracy_matches_brute_force_for_single_and_multi_label():
    rng = np.random.default_rng(1)
    classes = unit(rng.normal(size=(6, 8)))
    labels = rng.integers(0, 6, 40)
    images = unit(classes[labels] + 0.9 * rng.normal(size=(40, 8)))
    multi = labels[:, None] == np.arange(6)[None, :]
    multi[::4, 5] = True  # some images also have class 5
    multi[7] = False  # one image without labels
    for given in (labels, multi):
        positive = given[:, None] == np.arange(6) if given.ndim == 1 else given
        ranks = [
            brute_force_rank([float(image @ c) for c in classes], list(positive[n]))
            for n, image in enumerate(images)
            if positive[n].any()
        ]
        got = retrieval.zero_shot_accuracy(images, classes, given, ks=(1, 3))
        assert got["zero_shot/top1_accuracy"] == pytest.approx(np.mean([r <= 1 for r in ranks]))
        assert got["zero_shot/top3_accuracy"] == pytest.approx(np.mean([r <= 3 for r in ranks]))
        assert 0 < got["zero_shot/top1_accuracy"] < 1
    assert retrieval.zero_shot_accuracy(images, classes, multi)["images_without_label"] == 1


def test_zero_shot_chance_is_the_top_k_rate_over_every_ranking():
    """Chance top-k against all 5! orders of 5 classes, for images with 1, 2 and 3 labels."""
    orders = list(itertools.permutations(range(5)))
    labels = np.zeros((3, 5), bool)
    labels[0, 2] = labels[1, [0, 4]] = labels[2, [1, 2, 3]] = True
    for k in (1, 2, 3):
        hits = [np.mean([labels[n, list(order[:k])].any() for order in orders]) for n in range(3)]
        positives = labels.sum(axis=1)
        assert retrieval.chance_top_k(positives, 5, k) == pytest.approx(np.mean(hits))
    images = unit(np.random.default_rng(0).normal(size=(3, 4)))
    classes = unit(np.random.default_rng(1).normal(size=(5, 4)))
    got = retrieval.zero_shot_accuracy(images, classes, labels, ks=(1,))
    assert got["zero_shot/chance_top1"] == pytest.approx((1 + 2 + 3) / 15)


def test_class_prompts_fill_every_template():
    prompts = retrieval.class_prompts(["cat", "dog"], ("a photo of a {name}.", "a {name}"))
    assert prompts == [["a photo of a cat.", "a cat"], ["a photo of a dog.", "a dog"]]
    with pytest.raises(ValueError, match="each containing '{name}'"):
        retrieval.class_prompts(["cat"], ("a photo",))


def test_class_embeddings_average_templates_with_one_batch_shape():
    seen_shapes = []

    def embed_texts(batch):
        """Fake tower: embedding = one-hot of the text's first token, slot 0."""
        seen_shapes.append(batch["text_tokens"].shape)
        first = batch["text_tokens"][:, 0]
        embeddings = (first[:, None] == np.arange(4)[None, :]).astype(np.float32)[:, None]
        valid = batch["example_valid"] & (batch["text_segment_ids"] > 0).any(-1, keepdims=True)
        return embeddings, valid

    tokens = {"a cat": [0, 3], "the cat": [1, 3], "a dog": [0, 2], "the dog": [2]}
    got = retrieval.class_embeddings(
        embed_texts, tokens.__getitem__, ["cat", "dog"], seq_len=4,
        templates=("a {name}", "the {name}"), batch_size=3,
    )  # fmt: skip
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(got, [[s, s, 0, 0], [s, 0, s, 0]])
    assert seen_shapes == [(3, 4), (3, 4)]  # 4 prompts in calls of 3 rows: padded, one shape


def test_bad_inputs_raise_naming_the_input():
    images, texts = np.eye(3), np.eye(3)
    with pytest.raises(ValueError, match="text_image holds image indices in"):
        retrieval.retrieval_recall(images, texts, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="text_emb holds NaN"):
        retrieval.retrieval_recall(images, np.full((3, 3), np.nan), np.arange(3))
    with pytest.raises(ValueError, match="labels hold classes in"):
        retrieval.zero_shot_accuracy(images, texts, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="text 1 has 0 tokens"):
        retrieval.text_batch([[1, 2], []], seq_len=4)
