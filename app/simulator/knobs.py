"""Per-request behaviour of the simulator, read from the body's `simulator` object.

Knobs (all optional):
  reply, words              the exact reply text, or N generated words
  status, message,          answer with an OpenRouter error of that status (+ `Retry-After`,
  retry_after, error_type,    extra metadata, or the temporary in-flight 402)
  metadata, in_flight
  error_body_200            "envelope" | "choice": an error hidden in an HTTP 200 body
  stream_error, error_after 1..5: one of the in-stream error shapes, after N chunks (default 1)
  done_after_error          send `[DONE]` after the in-stream error
  usage_variant             "empty_choices" (default) | "choice" | "finish" | "none"
  omit_done                 end the stream without `[DONE]`
  keepalives                number of `: OPENROUTER PROCESSING` comments first
  ttfb_ms, chunk_delay_ms   latency before the headers, between chunks
  hang                      never answer
  reset                     "before_headers": drop the connection before answering
  reset_after, stall_after  drop the connection / go silent after N chunks
  malformed, malformed_after  "json": a broken body; N: a broken SSE event after N chunks
  cached_tokens             report N prompt tokens as cached
  tool_arguments            exact arguments of the tool call
  model_served, provider    answer as another model / provider
  generation_404s           times GET /generation 404s before it answers (default 1)
  id + sequence             a list of knob objects used on successive attempts with that id
  status_for                {model: status}: fail only requests for those models

On /responses and /messages the same knobs apply (counting SSE events where chat counts
chunks; `stream_error` 1..3 on /responses, any number on /messages), plus:
  error_shape               /responses: "numeric" (default, OR's `code: <int>` body) |
                              "responses" (string `code` + top-level `error_type`)
  usage_cost                false: no `cost`/`cost_details` in the usage of the body and events
                              (/generation and the log still bill it)
  event_names               /responses: false drops the `event:` lines (only `data:` is sent)
  omit_done                 /responses: end the stream without `[DONE]`
  cache_write_tokens        /messages: report N prompt tokens as cache writes
  start_usage               /messages: "zero" puts 0 in every field of message_start's usage
  stream_cost               /messages: true adds `cost` to message_delta's usage
  done                      /messages: true sends `data: [DONE]` after message_stop
"""

from __future__ import annotations

from typing import Any


def knobs_of(payload: dict[str, Any], attempts: dict[str, int]) -> dict[str, Any]:
    knobs = payload.get("simulator")
    if not isinstance(knobs, dict):
        return {}
    sequence = knobs.get("sequence")
    if isinstance(sequence, list) and sequence:
        key = str(knobs.get("id", ""))
        attempt = attempts.get(key, 0)
        attempts[key] = attempt + 1
        step = sequence[min(attempt, len(sequence) - 1)]
        knobs = {**knobs, **(step if isinstance(step, dict) else {}), "attempt": attempt}
    status_for = knobs.get("status_for")
    if isinstance(status_for, dict) and payload.get("model") in status_for:
        knobs = {**knobs, "status": status_for[payload["model"]]}
    return knobs
