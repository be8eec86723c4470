"""Print the headline of a `selpipe train` run directory's summary.json (for the demo)."""

import json
import sys

with open(sys.argv[1]) as handle:
    summary = json.load(handle)
final = summary["final"]
print(f"trained {summary['steps']} steps on {summary['world_size']} process(es) in {summary['seconds']} s")
if final:
    print(f"last step: loss {final['loss']:.4f}, margin {final['rewards/margins']:.4f} "
          f"(selected tokens: {final['selective/margins']:.4f}), "
          f"selected {final['selected_fraction/chosen']:.2f}/{final['selected_fraction/rejected']:.2f} (chosen/rejected), "
          f"{final['pairs_per_second']:.1f} pairs/s")
before, after = summary.get("eval_before"), summary.get("eval_after")
if before and after:
    print(f"eval preference accuracy: {before['eval/preference_accuracy']:.3f} before -> {after['eval/preference_accuracy']:.3f} after")
    print(f"eval DPO loss, every token: {before['eval/dpo_loss']:.4f} before -> {after['eval/dpo_loss']:.4f} after")
    print(f"eval training loss, selected tokens: {before['eval/loss']:.4f} before -> {after['eval/loss']:.4f} after "
          f"(the mask picks the tokens the policy gets most wrong, so this need not fall)")
elif after:
    print(f"eval preference accuracy: {after['eval/preference_accuracy']:.3f}")
print(f"model: {summary['output']}/model   metrics: {summary['output']}/metrics.jsonl")
