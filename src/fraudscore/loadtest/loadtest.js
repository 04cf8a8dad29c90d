// The contract's load test: POST requests (to /fraud-score, or the endpoint given) at the rates of
// the profile, each answer judged against the expected one by its `approved` and `fraud_score`. Driven by fraudscore/loadtest/k6.py, which passes one input:
//   LOADTEST_RUN  absolute path of a JSON object written by k6.py's run_description():
//     endpoint             the URL requests are posted to
//     entries              absolute path of a JSON array [[body, expected_approved, expected_fraud_score], ...]
//     summary              where handleSummary writes k6's end-of-test data as JSON
//     cycle                true: start again from the first entry when they run out (false: stop sending)
//     request_timeout      k6's per-request timeout
//     scenario             the k6 scenario (profile.py owns its rates, durations and VUs)
//     summary_trend_stats  the statistics results.py reads from the summary
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Counter } from 'k6/metrics';

if (!__ENV.LOADTEST_RUN) {
  throw new Error('LOADTEST_RUN must name the JSON file describing the run');
}
const run = JSON.parse(open(__ENV.LOADTEST_RUN));

// One copy for all VUs; open() cannot gunzip, so the driver writes a plain .json of just what k6 needs.
const entries = new SharedArray('entries', () => JSON.parse(open(run.entries)));

export const options = {
  scenarios: { contract: run.scenario },
  summaryTrendStats: run.summary_trend_stats,
  // Fewer tags make every sample of --out json smaller; nothing downstream reads the others.
  systemTags: ['status'],
};

// approved=false is a deny: the positive class is fraud.
const truePositives = new Counter('fraud_tp');
const trueNegatives = new Counter('fraud_tn');
const falsePositives = new Counter('fraud_fp');
const falseNegatives = new Counter('fraud_fn');
const httpErrors = new Counter('fraud_http_errors');
const scoreMismatches = new Counter('fraud_score_mismatches');

const params = { headers: { 'Content-Type': 'application/json' }, timeout: run.request_timeout };

function parse(res) {
  try {
    const answer = res.json();
    if (answer !== null && typeof answer.approved === 'boolean' && typeof answer.fraud_score === 'number') {
      return answer;
    }
  } catch (e) {
    // an unparseable body is an HTTP error, counted by the caller
  }
  return null;
}

export default function () {
  // Unique across the scenario, so each entry is sent once whatever VU runs the iteration.
  let i = exec.scenario.iterationInTest;
  if (i >= entries.length) {
    if (!run.cycle) {
      return; // the data is exhausted: the rest of the ramp sends nothing
    }
    i %= entries.length;
  }
  const [body, expectedApproved, expectedScore] = entries[i];
  const res = http.post(run.endpoint, body, params);
  const answer = res.status === 200 ? parse(res) : null;
  if (answer === null) {
    httpErrors.add(1); // non-200, timeout (status 0) or a body that is not the contract's answer
    return;
  }
  if (Math.abs(answer.fraud_score - expectedScore) > 1e-9) {
    scoreMismatches.add(1);
  }
  if (answer.approved) {
    (expectedApproved ? trueNegatives : falseNegatives).add(1);
  } else {
    (expectedApproved ? falsePositives : truePositives).add(1);
  }
}

export function handleSummary(data) {
  return { [run.summary]: JSON.stringify(data) };
}
