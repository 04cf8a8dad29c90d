// The contract's load test: an open-model ramp of POST /fraud-score requests, each judged against the
// expected answer. Driven by fraudscore/loadtest/command.py, which passes everything through -e:
//   LOADTEST_ENTRIES          absolute path of a JSON array [[body, expected_approved, expected_fraud_score], ...]
//   LOADTEST_URL              base URL of the service (default http://localhost:9999)
//   LOADTEST_RATE_MULTIPLIER  multiplies the start rate and the target rate (default 1)
//   LOADTEST_DURATION         length of the ramp in seconds (default 120)
//   LOADTEST_SUMMARY          where handleSummary writes k6's end-of-test data as JSON
//   LOADTEST_CYCLE            1: start again from the first entry when they run out (default 0: stop sending)
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Counter } from 'k6/metrics';

const START_RATE = 1; // requests per second at t = 0
const TARGET_RATE = 900; // requests per second at the end of the ramp
const MAX_VUS = 250;
const TIMEOUT = '2001ms';

const multiplier = Number(__ENV.LOADTEST_RATE_MULTIPLIER || '1');
const durationS = Number(__ENV.LOADTEST_DURATION || '120');
const endpoint = `${(__ENV.LOADTEST_URL || 'http://localhost:9999').replace(/\/+$/, '')}/fraud-score`;
const summaryPath = __ENV.LOADTEST_SUMMARY || 'loadtest-summary.json';
const cycle = __ENV.LOADTEST_CYCLE === '1';

if (!(multiplier > 0) || !(durationS > 0)) {
  throw new Error('LOADTEST_RATE_MULTIPLIER and LOADTEST_DURATION must be positive numbers');
}
if (!__ENV.LOADTEST_ENTRIES) {
  throw new Error('LOADTEST_ENTRIES must name the JSON file of entries');
}

// One copy for all VUs; open() cannot gunzip, so the driver writes a plain .json of just what k6 needs.
const entries = new SharedArray('entries', () => JSON.parse(open(__ENV.LOADTEST_ENTRIES)));

// k6 takes whole numbers of iterations per timeUnit: a fractional rate is expressed per 1000 s instead.
function rates() {
  const start = START_RATE * multiplier;
  const target = TARGET_RATE * multiplier;
  if (Number.isInteger(start) && Number.isInteger(target)) {
    return { startRate: start, target, timeUnit: '1s' };
  }
  return { startRate: Math.round(start * 1000), target: Math.round(target * 1000), timeUnit: '1000s' };
}

const { startRate, target, timeUnit } = rates();
const peakPerSecond = TARGET_RATE * multiplier;

export const options = {
  scenarios: {
    contract: {
      executor: 'ramping-arrival-rate',
      startRate,
      timeUnit,
      stages: [{ target, duration: `${Math.round(durationS * 1000)}ms` }],
      // Enough VUs for the peak at 100 ms per request; k6 adds more, up to maxVUs, when the service is slower.
      preAllocatedVUs: Math.min(MAX_VUS, Math.max(5, Math.ceil(peakPerSecond * 0.1))),
      maxVUs: MAX_VUS,
      // Longer than the request timeout, so requests in flight at the end are still judged.
      gracefulStop: '5s',
    },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(50)', 'p(90)', 'p(99)'],
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

const params = { headers: { 'Content-Type': 'application/json' }, timeout: TIMEOUT };

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
    if (!cycle) {
      return; // the data is exhausted: the rest of the ramp sends nothing
    }
    i %= entries.length;
  }
  const [body, expectedApproved, expectedScore] = entries[i];
  const res = http.post(endpoint, body, params);
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
  return { [summaryPath]: JSON.stringify(data) };
}
