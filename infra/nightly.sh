#!/usr/bin/env bash
# Nightly regeneration: submit tonight's run to a running Ray cluster, into a dated output prefix.
#
# Re-running it is safe: an attempt that is still running is followed instead of started twice; a failed or
# stopped attempt is followed by a new one (nightly-DATE-1, -2, ...) that resumes from the committed metadata,
# so each manifest row ends with exactly one video.
#
# Environment: RAY_ADDRESS (dashboard URL, e.g. http://ivmix-head-svc:8265), MANIFEST, OUTPUT_ROOT (required);
# CONFIG, EXPERIMENT, RUN_DATE (default: today, UTC), EXTRA_ARGS, MLFLOW_TRACKING_URI, RAY_AUTH_TOKEN (optional).
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard URL}"
: "${MANIFEST:?set MANIFEST to the nightly manifest URI}"
: "${OUTPUT_ROOT:?set OUTPUT_ROOT to the runs prefix}"
RUN_DATE="${RUN_DATE:-$(date -u +%F)}"
CONFIG="${CONFIG:-jobs/configs/animatediff.yaml}"
EXPERIMENT="${EXPERIMENT:-nightly}"
OUTPUT="${OUTPUT_ROOT%/}/${RUN_DATE}"
WORKDIR="${WORKDIR:-$(cd "$(dirname "$0")/.." && pwd)}"

status_of() {  # prints the Ray job status of a submission id (SUCCEEDED, RUNNING, ...), or nothing if there is no such job
  python - "$1" <<'PY'
import os
import sys

from ray.job_submission import JobSubmissionClient

try:
    info = JobSubmissionClient(os.environ["RAY_ADDRESS"]).get_job_info(sys.argv[1])
except RuntimeError as err:  # the SDK raises RuntimeError on HTTP errors; only "no such job" means "free id"
    if "does not exist" in str(err) or "404" in str(err):
        sys.exit(0)
    raise
print(getattr(info.status, "value", info.status))
PY
}

attempt=0
while :; do
  id="nightly-${RUN_DATE}-${attempt}"
  status="$(status_of "$id")"
  case "$status" in
    "")
      break ;;
    PENDING|RUNNING)
      echo "nightly: $id is $status; following it"
      ray job logs --address "$RAY_ADDRESS" --follow "$id"
      [ "$(status_of "$id")" = "SUCCEEDED" ]
      exit $? ;;
    *)
      echo "nightly: $id ended $status; next attempt resumes from the committed metadata"
      attempt=$((attempt + 1)) ;;
  esac
done

echo "nightly: submitting $id -> $OUTPUT"
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
exec ray job submit --address "$RAY_ADDRESS" --submission-id "$id" --working-dir "$WORKDIR" --entrypoint-num-cpus 0 -- \
  python jobs/generate.py --config "$CONFIG" --manifest "$MANIFEST" --output "$OUTPUT" \
  --experiment "$EXPERIMENT" --run-name "nightly-${RUN_DATE}" ${EXTRA_ARGS:-}
