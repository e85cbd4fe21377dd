"""Protocol logic of the benchmark scripts on small inputs with known results.

The scripts live in benchmarks/, which is not a package, so they and their helper modules are loaded by file path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.measures import linear_cka

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = ("_cli", "_contrastive", "_groups", "_text_features", "_seed_models", "_quick_inputs")


def load_benchmark_module(name: str):
    """Import benchmarks/<name>.py under its own name, loading the helper modules it imports from the same folder."""
    path = BENCHMARKS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(loaded.__file__).resolve() == path:
        return loaded
    if name not in HELPERS:
        for helper in HELPERS:
            load_benchmark_module(helper)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run on one thread: these inputs are tiny, and two threads on a busy 2-core machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


groups_module = load_benchmark_module("_groups")
contrastive = load_benchmark_module("_contrastive")
cli = load_benchmark_module("_cli")
layer_prediction = load_benchmark_module("layer_prediction")
multilingual = load_benchmark_module("multilingual")
image_caption = load_benchmark_module("image_caption")


# Grouping and distractors


def test_make_groups_consecutive_and_drops_incomplete():
    groups = groups_module.make_groups(10, 4)
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_make_groups_rejects_too_few_examples():
    with pytest.raises(ValueError, match="no complete group"):
        groups_module.make_groups(3, 4)


def test_random_distractors_avoid_true_group():
    groups = groups_module.make_groups(40, 8)
    generator = torch.Generator().manual_seed(0)
    distractors = groups_module.random_distractors(groups, 40, 10, generator)
    assert distractors.shape == (5, 10, 8)
    for group, chosen in zip(groups, distractors):
        assert not torch.isin(chosen, group).any()
        for distractor in chosen:
            assert distractor.unique().numel() == 8


def test_random_distractors_reproducible_with_seed():
    groups = groups_module.make_groups(40, 8)
    first = groups_module.random_distractors(groups, 40, 3, torch.Generator().manual_seed(5))
    second = groups_module.random_distractors(groups, 40, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_random_distractors_need_enough_examples():
    groups = groups_module.make_groups(12, 8)
    with pytest.raises(ValueError, match="at least 8 examples outside"):
        groups_module.random_distractors(groups, 12, 2, torch.Generator())


def test_nearest_distractors_known_neighbours():
    # Points on a line with growing gaps, so no two distances tie. Example 3 (at 6) has outside neighbours 2, 1, 0
    # in that order, and example 4 (at 10) has 5, 2, 1.
    features = torch.tensor([0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0, 28.0])[:, None]
    groups = torch.tensor([[3, 4]])
    distractors = groups_module.nearest_distractors(groups, features, 3)
    assert distractors.shape == (1, 3, 2)
    assert distractors[0, 0].tolist() == [2, 5]
    assert distractors[0, 1].tolist() == [1, 2]
    assert distractors[0, 2].tolist() == [0, 1]


def test_nearest_distractors_avoid_true_group():
    features = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    groups = groups_module.make_groups(64, 8)
    distractors = groups_module.nearest_distractors(groups, features, 10)
    for group, chosen in zip(groups, distractors):
        assert not torch.isin(chosen, group).any()


def test_nearest_distractors_closer_than_random():
    features = torch.randn(200, 4, generator=torch.Generator().manual_seed(2))
    groups = groups_module.make_groups(200, 8)
    nearest = groups_module.nearest_distractors(groups, features, 5)
    random = groups_module.random_distractors(groups, 200, 5, torch.Generator().manual_seed(0))
    anchors = features[groups][:, None]
    assert (features[nearest] - anchors).norm(dim=-1).mean() < (features[random] - anchors).norm(dim=-1).mean()


# Scores and accuracy


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_group_scores_match_library(unbiased):
    generator = torch.Generator().manual_seed(3)
    anchor = torch.randn(48, 6, generator=generator)
    candidate = anchor @ torch.randn(6, 5, generator=generator) + 0.5 * torch.randn(48, 5, generator=generator)
    groups = groups_module.make_groups(48, 8)
    distractors = groups_module.random_distractors(groups, 48, 4, generator)
    scores = groups_module.cka_group_scores(anchor, candidate, groups, distractors, unbiased)
    assert scores.shape == (6, 5)
    for row in range(6):
        candidates = [groups[row], *distractors[row]]
        for column, members in enumerate(candidates):
            expected = float(linear_cka(anchor[groups[row]], candidate[members], unbiased=unbiased))
            assert scores[row, column].item() == pytest.approx(expected, abs=1e-10)


def test_cka_group_scores_constant_group_is_nan():
    anchor = torch.randn(16, 3)
    candidate = torch.ones(16, 3)
    groups = groups_module.make_groups(16, 8)
    distractors = groups_module.random_distractors(groups, 16, 1, torch.Generator())
    scores = groups_module.cka_group_scores(anchor, candidate, groups, distractors, unbiased=False)
    assert torch.isnan(scores).all()


def test_contrasim_group_scores_mean_cosine():
    generator = torch.Generator().manual_seed(4)
    anchor = torch.nn.functional.normalize(torch.randn(12, 3, generator=generator), dim=1)
    candidate = torch.nn.functional.normalize(torch.randn(12, 3, generator=generator), dim=1)
    groups = torch.tensor([[0, 1, 2]])
    distractors = torch.tensor([[[5, 6, 7]]])
    scores = groups_module.contrasim_group_scores(anchor, candidate, groups, distractors)
    true_score = sum(float(anchor[i] @ candidate[i]) for i in range(3)) / 3
    distractor_score = sum(float(anchor[i] @ candidate[j]) for i, j in zip(range(3), (5, 6, 7))) / 3
    assert scores[0, 0].item() == pytest.approx(true_score, abs=1e-6)
    assert scores[0, 1].item() == pytest.approx(distractor_score, abs=1e-6)


def test_ranking_accuracy_strict_and_nan():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # right
            [0.5, 0.5, 0.1],  # tie with a distractor: wrong
            [0.2, 0.3, 0.1],  # a distractor is higher: wrong
            [0.9, math.nan, 0.1],  # NaN: wrong
        ],
        dtype=torch.float64,
    )
    assert groups_module.correct_groups(scores).tolist() == [True, False, False, False]
    assert groups_module.ranking_accuracy(scores) == 0.25


def test_group_protocol_finds_linear_translation():
    generator = torch.Generator().manual_seed(6)
    anchor = torch.randn(160, 10, generator=generator)
    candidate = anchor @ torch.randn(10, 10, generator=generator)
    groups = groups_module.make_groups(160, 8)
    distractors = groups_module.random_distractors(groups, 160, 10, generator)
    scores = groups_module.cka_group_scores(anchor, candidate, groups, distractors, unbiased=False)
    assert groups_module.ranking_accuracy(scores) == 1.0


# ContraSim encoders


def test_supcon_loss_two_views_matches_formula():
    generator = torch.Generator().manual_seed(7)
    features = torch.nn.functional.normalize(torch.randn(2, 3, 4, generator=generator), dim=-1)
    temperature = 0.5
    points = features.reshape(6, 4)
    expected = 0.0
    for anchor in range(6):
        positive = (anchor + 3) % 6
        logits = [float(points[anchor] @ points[k]) / temperature for k in range(6) if k != anchor]
        log_denominator = math.log(sum(math.exp(value) for value in logits))
        expected += -(float(points[anchor] @ points[positive]) / temperature - log_denominator)
    expected /= 6
    assert contrastive.supcon_loss(features, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_loss_lower_for_matching_views():
    generator = torch.Generator().manual_seed(8)
    view = torch.nn.functional.normalize(torch.randn(1, 16, 8, generator=generator), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(1, 16, 8, generator=generator), dim=-1)
    matching = contrastive.supcon_loss(torch.cat([view, view]), 0.07)
    unrelated = contrastive.supcon_loss(torch.cat([view, other]), 0.07)
    assert matching < unrelated


def test_supcon_loss_needs_two_views():
    with pytest.raises(ValueError, match="at least 2 views"):
        contrastive.supcon_loss(torch.ones(1, 3, 2), 0.07)


def test_plateau_rule_stops_when_loss_flat():
    rule = contrastive.StoppingRule(max_steps=1000, check_every=2, patience=3, min_decrease=0.01)
    log = contrastive.TrainingLog()
    tracker = contrastive._PlateauTracker(rule, log)
    losses = [5.0, 5.0, 4.0, 4.0] + [3.999] * 100
    stopped_at = next(step for step, loss in enumerate(losses, start=1) if tracker.record(loss))
    # Windows: 5.0, 4.0, then three windows of 3.999 without a decrease of 0.01.
    assert stopped_at == 10
    assert log.plateaued
    assert log.window_losses == pytest.approx([5.0, 4.0, 3.999, 3.999, 3.999])


def test_plateau_rule_stops_at_max_steps():
    rule = contrastive.StoppingRule(max_steps=7, check_every=2, patience=3)
    log = contrastive.TrainingLog()
    tracker = contrastive._PlateauTracker(rule, log)
    stops = [tracker.record(10.0 - step) for step in range(7)]
    assert stops == [False] * 6 + [True]
    assert not log.plateaued


def test_stopping_rule_rejects_bad_values():
    with pytest.raises(ValueError, match="max_steps"):
        contrastive.StoppingRule(max_steps=0)
    with pytest.raises(ValueError, match="min_decrease"):
        contrastive.StoppingRule(max_steps=5, min_decrease=-1.0)


def test_shared_encoder_input_layer_per_width():
    encoder = contrastive.SharedEncoder([3, 5, 3], ContraSimConfig(hidden_dims=(8,), out_dim=4), seed=0)
    assert sorted(encoder.inputs) == ["3", "5"]
    encoded = encoder(torch.randn(6, 5))
    assert encoded.shape == (6, 4)
    assert torch.allclose(encoded.norm(dim=1), torch.ones(6))
    with pytest.raises(ValueError, match="width 7"):
        encoder(torch.randn(2, 7))


def _synthetic_layers(
    num_models: int, num_layers: int, num_examples: int, width: int, seed: int, rotate: bool = True
) -> torch.Tensor:
    """Layers that share a per-layer signal across models, each model seeing it through its own rotation (or none)."""
    generator = torch.Generator().manual_seed(seed)
    signals = torch.randn(num_layers, num_examples, width, generator=generator)
    models = []
    for _ in range(num_models):
        rotation = torch.linalg.qr(torch.randn(width, width, generator=generator))[0] if rotate else torch.eye(width)
        noise = 0.1 * torch.randn(num_layers, num_examples, width, generator=generator)
        models.append(signals @ rotation + noise)
    return torch.stack(models)


def test_train_layer_encoder_learns_layers():
    layers = _synthetic_layers(num_models=3, num_layers=4, num_examples=96, width=6, seed=9)
    config = ContraSimConfig(hidden_dims=(32,), out_dim=16, lr=1e-2, batch_size=64)
    rule = contrastive.StoppingRule(max_steps=60, check_every=10, patience=2)
    encoder, log = contrastive.train_layer_encoder(layers[:, :, :64], config, rule)
    assert 0 < log.steps <= 60
    assert log.window_losses[-1] < log.window_losses[0]
    encoded = contrastive.encode(encoder, layers[:, :, 64:].reshape(-1, 6)).reshape(3, 4, 32, -1)
    similarity = layer_prediction.contrasim_similarity(encoded[0], encoded[1])
    assert layer_prediction.correct_layers(similarity).all()


def test_train_pair_encoder_aligns_pairs():
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(128, 5, generator=generator)
    y = x @ torch.randn(5, 7, generator=generator)
    config = ContraSimConfig(hidden_dims=(32,), out_dim=16, lr=1e-2, batch_size=64)
    encoder, log = contrastive.train_pair_encoder([(x[:96], y[:96])], config, contrastive.StoppingRule(40))
    assert log.steps == 40
    assert sorted(encoder.inputs) == ["5", "7"]
    matched = (contrastive.encode(encoder, x[96:]) * contrastive.encode(encoder, y[96:])).sum(dim=1).mean()
    shuffled = (contrastive.encode(encoder, x[96:]) * contrastive.encode(encoder, y[96:].flip(0))).sum(dim=1).mean()
    assert matched > shuffled


# Layer prediction


@pytest.mark.parametrize(
    ("num_models", "fold_size", "expected"),
    [(5, 2, [[0, 1], [2, 3], [4, 0]]), (4, 2, [[0, 1], [2, 3]]), (7, 3, [[0, 1, 2], [3, 4, 5], [6, 0, 1]])],
)
def test_unseen_folds(num_models, fold_size, expected):
    assert layer_prediction.unseen_folds(num_models, fold_size) == expected


def test_unseen_folds_need_two_training_models():
    with pytest.raises(ValueError, match="at least 2 models outside each fold"):
        layer_prediction.unseen_folds(3, 2)


def test_ordered_pairs_cover_both_directions():
    assert layer_prediction.ordered_pairs([2, 5, 7]) == [(2, 5), (2, 7), (5, 2), (5, 7), (7, 2), (7, 5)]


def test_correct_layers_rows_ties_and_nan():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # right
            [0.7, 0.7, 0.1],  # tie between layer 0 and layer 1: wrong
            [0.1, 0.8, 0.3],  # layer 1 is higher: wrong
        ]
    )
    assert layer_prediction.correct_layers(similarity).tolist() == [True, False, False]
    with_nan = torch.tensor([[math.nan, 0.0], [0.0, 1.0]])
    assert layer_prediction.correct_layers(with_nan).tolist() == [False, True]


def test_closed_form_similarity_finds_rotated_layers():
    layers = _synthetic_layers(num_models=2, num_layers=3, num_examples=80, width=5, seed=11)
    for measure in ("linear_cka", "svcca", "pwcca"):
        similarity = layer_prediction.closed_form_similarity(measure, layers[0], layers[1])
        assert similarity.shape == (3, 3)
        assert layer_prediction.correct_layers(similarity).all(), measure


def test_evaluate_family_counts_predictions():
    # Without rotations every model has the same layers up to noise, so both protocols must find every layer. A
    # mix-up of models, layers or folds would show as a miss.
    layers = _synthetic_layers(num_models=4, num_layers=3, num_examples=100, width=5, seed=12, rotate=False)
    data = load_benchmark_module("_seed_models").LayerData("synthetic", layers[:, :, :60], layers[:, :, 60:], ["a"] * 4)
    args = layer_prediction.parse_args(
        ["--measures", "contrasim", "linear_cka", "--batch-size", "32", "--max-steps", "20", "--check-every", "10"]
    )
    result = layer_prediction.evaluate_family(data, args, torch.device("cpu"))
    # same_seeds: 12 ordered pairs x 3 layers; unseen_seeds: folds {0, 1} and {2, 3}, 4 ordered pairs x 3 layers.
    assert result.total[("contrasim", "same_seeds")] == 36
    assert result.total[("contrasim", "unseen_seeds")] == 12
    assert result.total[("linear_cka", "unseen_seeds")] == 12
    assert result.accuracy("linear_cka", "same_seeds") == 1.0
    assert result.accuracy("contrasim", "same_seeds") == 1.0
    assert result.accuracy("contrasim", "unseen_seeds") == 1.0
    summary = layer_prediction.summarize([result], ["contrasim", "linear_cka"])
    assert sorted(summary) == [
        "contrasim_same_seeds",
        "contrasim_unseen_seeds",
        "linear_cka_same_seeds",
        "linear_cka_unseen_seeds",
    ]


# Data files and representations


def test_read_parallel_file_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("en\tfr\nhello there\tbonjour\ngood night\tbonne nuit\n", encoding="utf-8")
    sentences = multilingual.read_parallel_file(path, None)
    assert sentences == {"en": ["hello there", "good night"], "fr": ["bonjour", "bonne nuit"]}


def test_read_parallel_file_jsonl_selects_languages(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"en": "one", "de": "eins", "fr": "un"}, {"en": "two", "de": "zwei", "fr": "deux"}]
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    assert multilingual.read_parallel_file(path, ["fr", "en"]) == {"fr": ["un", "deux"], "en": ["one", "two"]}


def test_read_parallel_file_errors_name_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("en\tfr\nhello\tbonjour\nagain\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.tsv:3: missing or empty sentence for language 'fr'"):
        multilingual.read_parallel_file(path, None)
    with pytest.raises(ValueError, match=r"languages \['zh'\] not found"):
        multilingual.read_parallel_file(path, ["en", "zh"])


def test_read_pairs_resolves_relative_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    listing = tmp_path / "pairs.jsonl"
    listing.write_text(json.dumps({"image": "a.png", "caption": " a cat "}) + "\n", encoding="utf-8")
    images, captions = image_caption.read_pairs(listing, limit=10)
    assert images == [tmp_path / "a.png"]
    assert captions == ["a cat"]


def test_read_pairs_missing_image(tmp_path):
    listing = tmp_path / "pairs.tsv"
    listing.write_text("image\tcaption\nmissing.png\ta dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.tsv:2: image file not found"):
        image_caption.read_pairs(listing, limit=10)


def test_pool_image_states_shapes():
    sequence = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    feature_map = torch.arange(32, dtype=torch.float32).view(2, 4, 2, 2)
    assert torch.equal(image_caption.pool_image_states(sequence, "auto"), sequence[:, 0])
    assert torch.equal(image_caption.pool_image_states(feature_map, "auto"), feature_map.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="only be mean-pooled"):
        image_caption.pool_image_states(feature_map, "first")


def test_tiny_vision_models_pool_per_image(tmp_path):
    quick_inputs = load_benchmark_module("_quick_inputs")
    listing = quick_inputs.write_digit_captions(tmp_path, "pairs", range(3))
    paths, _ = image_caption.read_pairs(listing, limit=3)
    for architecture in ("vit", "convnext"):
        folder = quick_inputs.save_tiny_vision_model(tmp_path / architecture, architecture)
        model, processor = image_caption.load_vision_model(str(folder), torch.device("cpu"))
        batched = image_caption.image_states(model, processor, paths, "auto", batch_size=3)
        alone = image_caption.image_states(model, processor, paths[2:], "auto", batch_size=1)
        assert batched.shape[0] == 3
        assert torch.allclose(batched[2], alone[0], atol=1e-5)


def test_last_token_pooling_ignores_padding(tmp_path):
    text_features = load_benchmark_module("_text_features")
    folder = load_benchmark_module("_quick_inputs").save_tiny_text_model(tmp_path / "gpt2", "gpt2")
    model, tokenizer = text_features.load_text_model(str(folder))
    texts = ["a short line", "a much longer line of text that needs padding in a batch"]
    batched = text_features.pooled_text_states(model, tokenizer, texts, "last")
    alone = text_features.pooled_text_states(model, tokenizer, texts[:1], "last")
    assert batched.shape[:2] == (2, 2)
    assert torch.allclose(batched[:, 0], alone[:, 0], atol=1e-5)


def test_word_states_average_subword_tokens(tmp_path):
    text_features = load_benchmark_module("_text_features")
    folder = load_benchmark_module("_quick_inputs").save_tiny_text_model(tmp_path / "bert", "bert")
    model, tokenizer = text_features.load_text_model(str(folder))
    texts = ["methinks the lady doth protest", "too much"]
    states, words = text_features.word_states(model, tokenizer, texts, num_words=6)
    assert words == ["methinks", "the", "lady", "doth", "protest", "too"]
    encoded = tokenizer([texts[0].split()], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded, output_hidden_states=True).hidden_states[1:]
    positions = [index for index, word in enumerate(encoded.word_ids(0)) if word == 0]
    expected = torch.stack([layer[0, positions].mean(dim=0) for layer in hidden])
    assert torch.allclose(states[:, 0], expected, atol=1e-5)


def test_word_states_too_few_words(tmp_path):
    text_features = load_benchmark_module("_text_features")
    folder = load_benchmark_module("_quick_inputs").save_tiny_text_model(tmp_path / "bert", "bert")
    model, tokenizer = text_features.load_text_model(str(folder))
    with pytest.raises(ValueError, match="contain 2 words"):
        text_features.word_states(model, tokenizer, ["two words"], num_words=5)


def test_digits_family_cached_by_settings(tmp_path):
    seed_models = load_benchmark_module("_seed_models")
    family = seed_models.DigitsFamily(blocks=2, width=8, epochs=1)
    first = family.build(2, tmp_path)
    second = family.build(2, tmp_path)
    assert first.train.shape == (2, 2, 400, 8)
    assert first.test.shape == (2, 2, 400, 8)
    assert torch.equal(first.test, second.test)
    assert any("seed 1: trained" in note for note in first.notes)
    assert any("seed 1: cached" in note for note in second.notes)
    other = seed_models.family_folder(tmp_path, seed_models.DigitsFamily(blocks=3, width=8, epochs=1))
    assert other != seed_models.family_folder(tmp_path, family)


def test_write_json_exact_dictionary(tmp_path):
    path = tmp_path / "nested" / "result.json"
    cli.write_json(path, {"contrasim_random": 0.5, "linear_cka_random": 1})
    assert json.loads(path.read_text()) == {"contrasim_random": 0.5, "linear_cka_random": 1.0}
