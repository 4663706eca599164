"""MLflow's run tags for gradtrace's counters: set at the first logging step and again at the end, not at every
step (each tag update is a database commit of its own)."""

from __future__ import annotations

from gradtrace.sinks.payload import LiveCharts


def summary_at(step: int) -> dict:
    """A summary whose counters move like a run's: optimizer_steps grows, tracked_elements stays."""
    return {"step": step, "global": {"optimizer_steps": step, "tracked_elements": 10, "update_sparsity": 1 / step},
            "per_kind": {}, "per_layer": {},
            "per_matrix": {"model.layers.0.mlp.down_proj.weight": {"numel": 10, "update_sparsity": 1 / step}}}


def test_counter_tags_at_the_first_log_and_the_end(tmp_path):
    import mlflow

    from gradtrace.sinks.mlflow import MlflowSink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("tags", artifact_location=(tmp_path / "a").as_uri())
    sink = MlflowSink(charts=LiveCharts(heatmaps=False))
    with mlflow.start_run(experiment_id=experiment) as run:
        tags = []
        for step in (1, 2, 3):
            sink.log(summary_at(step), step)
            tags.append(client.get_run(run.info.run_id).data.tags)
        sink.finish(summary_at(3), tmp_path)
    assert [t["gradtrace/optimizer_steps"] for t in tags] == ["1", "1", "1"]  # the first step's, until the end
    assert all(t["gradtrace/tracked_elements"] == "10" for t in tags)
    end = client.get_run(run.info.run_id).data.tags
    assert end["gradtrace/optimizer_steps"] == "3" and end["gradtrace/final/optimizer_steps"] == "3"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "gradtrace/update_sparsity")] == [1, 1 / 2, 1 / 3]
