"""Generation quality by exit layer: text decoded with only the first k blocks (+ final norm +
unembedding), scored against the references with BLEU, ROUGE-L and BERTScore."""

from layerwise import checks


def test_final_exit_beats_every_earlier_exit(layerwise_check, layerwise_results, layerwise_settings):
    s = layerwise_settings
    layerwise_check(checks.quality_by_exit(layerwise_results, s["min-rouge-gain"], s["min-bleu-gain"], s["check-bertscore"]))


def test_every_exit_generated_for_every_row(early_exit_generations, layerwise_results):
    rows = layerwise_results["run"]["data"]["rows"]
    for layer, texts in early_exit_generations.items():
        assert len(texts) == rows, f"exit layer {layer}: {len(texts)} generations for {rows} rows"
    final = max(early_exit_generations)
    empty = sum(1 for t in early_exit_generations[final] if not t.strip())
    assert empty < rows, f"the final exit layer {final} generated nothing for all {rows} rows"
