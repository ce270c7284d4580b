// The OpenAI Node SDK against Tether's Responses API, as a Node user drives it: a background
// response read from its event stream, the stream dropped and resumed with `starting_after`
// (compared with a full replay: no gap, no duplicate), and a second background response
// cancelled mid-generation. tests/test_node_sdk.py runs this with a fake model whose
// replies it chose for the two prompts, and checks the model connection of the cancelled
// response closed at the fake.
//
//   node tests/node/responses.mjs BASE_URL MODEL RESUME_PROMPT CANCEL_PROMPT
//
// BASE_URL is the server's root (http://127.0.0.1:PORT). Prints one JSON summary on stdout;
// any failed check throws, which exits 1 with the reason on stderr.
import OpenAI from "openai";
import { VERSION } from "openai/version";

// Events read from the first stream before dropping it: past the response's first three
// (created, queued, in_progress), so that the resume starts inside the answer.
const FIRST_READ = 5;

function check(ok, message) {
  if (!ok) throw new Error(`check failed: ${message}`);
}

// The first `n` events of a stream; leaving the loop aborts the request (the SDK closes it).
async function take(stream, n) {
  const events = [];
  for await (const event of stream) {
    events.push(event);
    if (events.length >= n) break;
  }
  return events;
}

// Every event of a stream, until the server ends it after the terminal event.
async function all(stream) {
  const events = [];
  for await (const event of stream) events.push(event);
  return events;
}

// Events until (and with) the first of type `type`; then the stream is dropped.
async function until(stream, type) {
  const events = [];
  for await (const event of stream) {
    events.push(event);
    if (event.type === type) return events;
  }
  throw new Error(`the stream ended without a ${type} event`);
}

const numbers = (events) => events.map((e) => e.sequence_number);

// The text of a Response's output messages (the SDK adds `output_text` to what `create`
// and `retrieve` answer, not to what `cancel` answers).
function outputText(response) {
  return response.output
    .filter((item) => item.type === "message")
    .flatMap((item) => item.content)
    .filter((part) => part.type === "output_text")
    .map((part) => part.text)
    .join("");
}

function checkIncreasing(events, what) {
  const seq = numbers(events);
  for (let i = 1; i < seq.length; i++) {
    check(seq[i] > seq[i - 1], `${what}: sequence numbers not increasing at ${i}: ${seq}`);
  }
}

async function resume(client, model, input) {
  const created = await client.responses.create({ model, input, background: true });
  check(created.status === "queued", `create answered status ${created.status}, not queued`);
  check(created.background === true, "create answered background false");

  const first = await take(
    await client.responses.retrieve(created.id, { stream: true }),
    FIRST_READ,
  );
  check(first.length === FIRST_READ, `the first stream gave ${first.length} events`);
  const after = first.at(-1).sequence_number;
  const rest = await all(
    await client.responses.retrieve(created.id, { stream: true, starting_after: after }),
  );
  check(rest.length > 0, "the resumed stream gave no event");
  check(rest[0].sequence_number > after, `the resumed stream repeated ${rest[0].sequence_number}`);
  const full = await all(await client.responses.retrieve(created.id, { stream: true }));
  checkIncreasing(full, "full replay");
  checkIncreasing([...first, ...rest], "first stream then resumed stream");

  // The first stream and the resumed one together are the full replay: every event once,
  // in order, the same event.
  const joined = [...first, ...rest];
  check(
    JSON.stringify(numbers(joined)) === JSON.stringify(numbers(full)),
    `first + resumed ${numbers(joined)} != full replay ${numbers(full)}`,
  );
  check(JSON.stringify(joined) === JSON.stringify(full), "an event differs from the replay's");
  check(full.at(-1).type === "response.completed", `ended with ${full.at(-1).type}`);

  const done = await client.responses.retrieve(created.id);
  const streamed = full
    .filter((e) => e.type === "response.output_text.delta")
    .map((e) => e.delta)
    .join("");
  check(done.output_text === streamed, "the retrieved text differs from the streamed deltas");
  return {
    id: created.id,
    created_status: created.status,
    first_types: first.map((e) => e.type),
    first_sequence_numbers: numbers(first),
    starting_after: after,
    resumed_sequence_numbers: numbers(rest),
    full_sequence_numbers: numbers(full),
    last_type: full.at(-1).type,
    status: done.status,
    output_text: done.output_text,
  };
}

async function cancel(client, model, input) {
  const created = await client.responses.create({ model, input, background: true });
  check(created.status === "queued", `create answered status ${created.status}, not queued`);
  // The model is generating once a piece of text has come: the cancel finds its stream open.
  const seen = await until(
    await client.responses.retrieve(created.id, { stream: true }),
    "response.output_text.delta",
  );
  const cancelled = await client.responses.cancel(created.id);
  check(cancelled.status === "cancelled", `cancel answered status ${cancelled.status}`);
  const again = await client.responses.cancel(created.id);
  check(again.status === "cancelled", `a second cancel answered status ${again.status}`);
  const retrieved = await client.responses.retrieve(created.id);
  check(retrieved.status === "cancelled", `retrieve after cancel: status ${retrieved.status}`);
  const tail = await all(await client.responses.retrieve(created.id, { stream: true }));
  checkIncreasing(tail, "replay of the cancelled response");
  return {
    id: created.id,
    created_status: created.status,
    types_before_cancel: seen.map((e) => e.type),
    status: cancelled.status,
    second_cancel_status: again.status,
    retrieved_status: retrieved.status,
    output_text: outputText(cancelled),
    last_type: tail.at(-1).type,
    last_response_status: tail.at(-1).response?.status ?? null,
  };
}

async function main() {
  const [baseURL, model, resumePrompt, cancelPrompt] = process.argv.slice(2);
  if (!cancelPrompt) {
    throw new Error("usage: node responses.mjs BASE_URL MODEL RESUME_PROMPT CANCEL_PROMPT");
  }
  const client = new OpenAI({
    baseURL: `${baseURL.replace(/\/$/, "")}/v1`,
    apiKey: "unused",
    maxRetries: 0,
    timeout: 20_000,
  });
  const summary = {
    node: process.version,
    sdk: VERSION,
    resume: await resume(client, model, resumePrompt),
    cancel: await cancel(client, model, cancelPrompt),
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
