"""The case strings of bench/bench_round.py: MODEL@DATASET[@STEPS][@KEY=VALUE...]."""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_round.py")


def test_a_case_names_model_dataset_steps_and_any_other_option():
    spec = importlib.util.spec_from_file_location("bench_round", _PATH)
    bench_round = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_round)  # it puts bench/ on sys.path for its loop_round
    parse = bench_round.parse_case
    assert parse("cnn:4-8@fashion_mnist@2@conv=grouped@client_chunk=64@lr=0.01@lr_decay=false") == {
        "model": ["cnn:4-8"], "dataset": "fashion_mnist", "steps_per_round": 2, "conv": "grouped",
        "client_chunk": 64, "lr": 0.01, "lr_decay": False}
    assert parse("mlp:16") == {"model": ["mlp:16"], "dataset": "digits", "steps_per_round": 5}
