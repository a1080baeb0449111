"""Zero-shot evaluation of a two-tower model: image<->text retrieval recall@k and zero-shot
classification with class-name prompts, computed from L2-normalised embeddings.

Ranking (one rule everywhere): a query's candidates are ranked by cosine similarity, computed
in float64. The query counts as a hit at k when its best-scoring correct candidate is among
the first k. **Ties are broken against the model**: a wrong candidate scoring exactly as much
as the best correct one is ranked above it, so a collapsed model (all embeddings equal) scores
0, never 1, and the result does not depend on the order of the candidates.
- image -> text: the correct candidates of image i are all its captions (several per image
  count once: the best one decides). Images without any caption are left out (counted).
- text -> image: the correct candidate of a caption is its image.
- zero-shot: an image's correct candidates are its classes (one label, or several for
  multi-label data); top-k accuracy is recall@k of image -> class-prompt retrieval.
"""

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

DEFAULT_TEMPLATES = ("a photo of a {name}.",)
RECALL_KS = (1, 5, 10)
# Query rows scored at once: bounds the [chunk, candidates] float64 score matrix in memory.
QUERY_CHUNK = 1024

# embed(batch) -> (embeddings [B, E, D], valid [B, E]); e.g. a jitted TwoTower.embed_texts.
EmbedFn = Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def _check_embeddings(name: str, embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be [N, D] embeddings; got shape {embeddings.shape}.")
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{name} holds NaN or inf; evaluate a model whose outputs are finite.")
    return embeddings.astype(np.float64)


def best_positive_ranks(
    queries: np.ndarray,
    candidates: np.ndarray,
    positives: Callable[[int, int], np.ndarray],
    chunk_size: int = QUERY_CHUNK,
) -> np.ndarray:
    """1-based rank [Q] of each query's best correct candidate, ties against the model.

    queries [Q, D], candidates [M, D]; `positives(start, stop)` -> bool [stop - start, M] marks
    the correct candidates of queries start..stop-1. A query without any gets rank M + 1.
    """
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ candidates.T  # [q, M] float64
        positive = positives(start, stop)  # [q, M]
        best = np.max(np.where(positive, scores, -np.inf), axis=1, initial=-np.inf)  # [q]
        beaten_by = np.sum(~positive & (scores >= best[:, None]), axis=1)  # [q]
        ranks[start:stop] = np.where(np.isfinite(best), 1 + beaten_by, len(candidates) + 1)
    return ranks


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k both ways. image_emb [N, D]; text_emb [M, D]; text_image [M] int, the image
    (row of image_emb) each caption belongs to.

    Returns `image_to_text/recall@k`, `text_to_image/recall@k` (fractions in [0, 1]),
    `num_images`, `num_texts` and `images_without_text` (left out of image -> text).
    """
    images = _check_embeddings("image_emb", image_emb)
    texts = _check_embeddings("text_emb", text_emb)
    text_image = np.asarray(text_image)
    if text_image.shape != (len(texts),) or text_image.dtype.kind not in "iu":
        raise ValueError(
            f"text_image must be int [{len(texts)}] (one image index per caption); got "
            f"{text_image.dtype} {text_image.shape}."
        )
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= len(images)):
        raise ValueError(
            f"text_image holds image indices in [{text_image.min()}, {text_image.max()}] but "
            f"there are {len(images)} images; every index must be a row of image_emb."
        )
    has_text = np.zeros(len(images), bool)
    has_text[text_image] = True
    queried = np.flatnonzero(has_text)  # images with at least one caption
    image_ranks = best_positive_ranks(
        images[queried], texts, lambda a, b: text_image[None, :] == queried[a:b, None]
    )
    image_rows = np.arange(len(images))
    text_ranks = best_positive_ranks(
        texts, images, lambda a, b: image_rows[None, :] == text_image[a:b, None]
    )
    results: dict[str, float] = {}
    for k in ks:
        results[f"image_to_text/recall@{k}"] = _fraction(image_ranks <= k)
        results[f"text_to_image/recall@{k}"] = _fraction(text_ranks <= k)
    results.update(
        num_images=len(images), num_texts=len(texts), images_without_text=int((~has_text).sum())
    )
    return results


def zero_shot_accuracy(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of classifying images by their nearest class-prompt embedding.

    image_emb [N, D]; class_emb [C, D]; labels int [N] (one class each) or bool [N, C]
    (multi-label: a hit when any of the image's classes is within the top k). Images without
    any label are left out (counted in `images_without_label`).
    """
    images = _check_embeddings("image_emb", image_emb)
    classes = _check_embeddings("class_emb", class_emb)
    labels = np.asarray(labels)
    if labels.ndim == 1 and labels.dtype.kind in "iu":
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(
                f"labels hold classes in [{labels.min()}, {labels.max()}] but class_emb has "
                f"{len(classes)} rows; labels must index class_emb."
            )
        labels = labels[:, None] == np.arange(len(classes))[None, :]  # [N, C]
    if labels.shape != (len(images), len(classes)) or labels.dtype != bool:
        raise ValueError(
            f"labels must be int [{len(images)}] or bool [{len(images)}, {len(classes)}]; got "
            f"{labels.dtype} {labels.shape}."
        )
    labelled = labels.any(axis=1)
    labels = labels[labelled]
    ranks = best_positive_ranks(images[labelled], classes, lambda a, b: labels[a:b])
    results = {f"zero_shot/top{k}_accuracy": _fraction(ranks <= k) for k in ks}
    positives = labels.sum(axis=1)  # [n] classes each labelled image has
    for k in ks:
        results[f"zero_shot/chance_top{k}"] = chance_top_k(positives, len(classes), k)
    results.update(num_images=len(images), images_without_label=int((~labelled).sum()))
    return results


def chance_top_k(positives: np.ndarray, num_classes: int, k: int) -> float:
    """Top-k accuracy of a uniformly random ranking of `num_classes` classes, averaged over
    images with `positives[n]` correct classes each: 1 - C(C - p, k) / C(C, k)."""
    positives = np.asarray(positives)
    if positives.size == 0:
        return 0.0
    misses = np.array([math.comb(num_classes - p, k) for p in positives], dtype=np.float64)
    return float(np.mean(1.0 - misses / math.comb(num_classes, k)))


def _fraction(hits: np.ndarray) -> float:
    """Mean of a boolean array; 0.0 when there is nothing to count (no NaN in reports)."""
    return float(hits.mean()) if hits.size else 0.0


def class_prompts(
    class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> list[list[str]]:
    """Prompts [C][T]: every template with `{name}` filled by every class name."""
    if not templates or any("{name}" not in t for t in templates):
        raise ValueError(
            f"templates={list(templates)!r}: give at least one, each containing '{{name}}' "
            "(e.g. 'a photo of a {name}.')."
        )
    return [[template.format(name=name) for template in templates] for name in class_names]


def text_batch(token_lists: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
    """One text per row (slot 0) as a text-tower batch: `text_tokens`, `text_segment_ids`
    [n, seq_len], `example_valid` [n, 1]. Prompts are few, so no packing is needed."""
    batch = {
        "text_tokens": np.zeros((len(token_lists), seq_len), np.int32),
        "text_segment_ids": np.zeros((len(token_lists), seq_len), np.int32),
        "example_valid": np.ones((len(token_lists), 1), bool),
    }
    for row, tokens in enumerate(token_lists):
        if not 0 < len(tokens) <= seq_len:
            raise ValueError(
                f"text {row} has {len(tokens)} tokens; each text needs 1 to seq_len={seq_len} "
                "tokens (shorten the prompt template or raise seq_len)."
            )
        batch["text_tokens"][row, : len(tokens)] = tokens
        batch["text_segment_ids"][row, : len(tokens)] = 1
    return batch


def embed_token_lists(
    embed_texts: EmbedFn, token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int
) -> np.ndarray:
    """Embeddings [n, D] of texts, `batch_size` rows per call (the last call padded with
    invalid rows, so the embedding function always sees one shape and compiles once)."""
    outputs = []
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start : start + batch_size]
        missing = batch_size - len(chunk)  # empty, invalid rows
        batch = {
            key: np.pad(value, [(0, missing)] + [(0, 0)] * (value.ndim - 1))
            for key, value in text_batch(chunk, seq_len).items()
        }
        embeddings, valid = embed_texts(batch)
        if not np.asarray(valid)[: len(chunk), 0].all():
            raise ValueError("embed_texts marked a non-empty text invalid; check the model.")
        outputs.append(np.asarray(embeddings)[: len(chunk), 0])  # [chunk, D]
    return np.concatenate(outputs)


def class_embeddings(
    embed_texts: EmbedFn,
    tokenize: Callable[[str], Sequence[int]],
    class_names: Sequence[str],
    *,
    seq_len: int,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> np.ndarray:
    """One unit embedding per class [C, D]: the mean over prompt templates of the prompts'
    embeddings, re-normalised (CLIP's prompt ensembling). `tokenize` must be the function
    that tokenized the training captions, so prompts look like captions to the text tower."""
    prompts = class_prompts(class_names, templates)  # [C][T]
    flat = [tokenize(prompt) for per_class in prompts for prompt in per_class]
    embeddings = embed_token_lists(embed_texts, flat, seq_len, batch_size)
    mean = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)  # [C, D]
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
