"""Reading `dvc exp show --json` in tests: experiment name -> (params.yaml, metrics/eval.json)."""

from __future__ import annotations


def shown_experiments(shown: list) -> dict[str, tuple[dict, dict]]:
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics/eval.json", {}).get("data", {})
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                found[rev.get("name") or exp.get("name")] = (params, metrics)
    return found
