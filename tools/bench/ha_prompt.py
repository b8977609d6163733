"""Home Assistant's Assist prompt for a realistic home, in our tokens, and whether repeated Assist turns reuse the
daemon's cached prompt prefix.

What Home Assistant sends, rendered as it renders it (home-assistant/core; read with the search tools):
- homeassistant/components/conversation/chat_log.py @ 01bc0afafea1a7fce60ca97305d6e3e234bbbcf9,
  `async_provide_llm_data`: the system message is the instructions (llm.DEFAULT_INSTRUCTIONS_PROMPT), a newline,
  the Assist API prompt; DATE_TIME_PROMPT ("Current time is HH:MM:SS. Today's date is ...") is appended only when
  no tool named *GetDateTime is offered (the Assist API always offers one).
- homeassistant/helpers/llm.py @ 004be187e720f879eace3c615f55204519f21859: the prompt constants,
  `AssistAPI._async_get_api_prompt` (control usage, the area line, the no-timer line, DYNAMIC_CONTEXT_PROMPT,
  "Static Context" and the exposed entities as YAML: names, domain, areas; no state since the live state moved
  to the GetLiveContext tool), `_get_exposed_entities` (sorted by name), `_async_get_tools` (intents not in
  IGNORE_INTENTS whose platforms are exposed, GetDateTime, todo_get_items, GetLiveContext) and GetLiveContextTool
  (its result: "Live Context: ..." and the entities as YAML with state and the interesting attributes).
- tests/helpers/snapshots/test_llm.ambr @ 0dde553653f16acb40d88523783f9c56d484f818: the tools' JSON schemas as
  HA converts them (HassTurnOn/Off, HassCancelAllTimers, HassList*, GetDateTime, GetLiveContext, todo_get_items),
  and the YAML key order (names, domain, areas: not sorted).
- homeassistant/components/intent/__init__.py @ 02c28258973c4848b2e51b304a69076860222d15: HassLock/HassUnlock/
  HassOpen/HassClose, offered only when a lock / cover is exposed.
- The domain intents (HassLightSet, HassClimateSetTemperature, HassFanSetSpeed, HassSetPosition, HassStopMoving,
  the media player ones, HassVacuumStart/ReturnToBase): the schemas HA's MCP server lists for them, as third-party
  code transcribes them (not read from HA's own files: a few tokens either way).
- homeassistant/components/ollama/entity.py @ 0d0db908b51dbf85c545f1374dd124c98afc3759: each tool sent as
  {"type": "function", "function": {"name", "parameters", "description"}}, a tool result as a `tool` message whose
  content is json_dumps({"data": result.data, "error": result.error}), options={"num_ctx": 8192}.

The request is a typed Assist turn (no satellite device: timers are not offered and an unnamed area is asked
for). Tokens are counted as the daemon builds its prompt (prompting/template.py with the model's own chat template,
tools rendered by it): the Llama-3.2 tokenizer and template (tests/conftest.py llama_tokenizer_dir) and the embedded
SmolLM2-135M (its GGUF's template and tokenizer). `needed_kv` adds the daemon's default reply reserve (256 tokens).

With a daemon (default), the embedded model serves the same requests through the Ollama API with
engine.kv_tokens 8192 (SmolLM2's trained context is 8192: llama.context_length in its GGUF), and the first-token
time of a turn whose prompt is new is compared with turns that share the cached prefix (the next turn of the same
conversation, then a new conversation with the same system prompt and tools), interleaved per repetition.

    .venv/bin/python tools/bench/ha_prompt.py [--entities 10 50 150] [--reps 3] [--no-daemon]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from edge_llama.protocol import Message, ToolCall, ToolSpec  # noqa: E402

RESERVE = 256  # the daemon's default reply budget (generation.max_tokens), reserved in the KV budget

# --- homeassistant/helpers/llm.py @ 004be187, verbatim -------------------------------------------------------------
DATE_TIME_PROMPT = 'Current time is {time}. Today\'s date is {date}.\n'  # the Jinja now() calls, rendered
DEFAULT_INSTRUCTIONS_PROMPT = """You are a voice assistant for Home Assistant.
Answer questions about the world truthfully.
Answer in plain text. Keep it simple and to the point.
"""
DEVICE_CONTROL_TOOL_USAGE_PROMPT = (
    "When controlling Home Assistant always call the intent tools. "
    "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
    "When controlling a device, prefer passing just name and domain. "
    "When controlling an area, prefer passing just area name and domain."
)
AREA_PROMPT_NO_DEVICE = ("When a request names a generic device without an area, "
                         "ask the user to specify which area they mean before targeting.")
NO_TIMER_PROMPT = "This device is not able to start timers."
DYNAMIC_CONTEXT_PROMPT = (
    "You ARE equipped to answer questions about the current state of\n"
    "the home using the `GetLiveContext` tool. This is a primary function. Do not state you lack the\n"
    "functionality if the question requires live data.\n"
    'If the user asks about device existence/type (e.g., "Do I have lights in the bedroom?"): Answer\n'
    "from the static context below.\n"
    'If the user asks about the CURRENT state, value, or mode (e.g., "Is the lock locked?",\n'
    '"Is the fan on?", "What mode is the thermostat in?", "What is the temperature outside?"):\n'
    "    1.  Recognize this requires live data.\n"
    "    2.  You MUST call `GetLiveContext`. This tool will provide the needed real-time information (like "
    "temperature from the local weather, lock status, etc.).\n"
    "    3.  Use the tool's response** to answer the user accurately (e.g., \"The temperature outside is "
    "[value from tool].\").\n"
    "For general knowledge questions not about the home: Answer truthfully from internal knowledge.\n"
)

# --- a realistic home ----------------------------------------------------------------------------------------------
AREAS = [("Living Room", ["Lounge"]), ("Kitchen", []), ("Bedroom", ["Master Bedroom"]), ("Office", ["Study"]),
         ("Bathroom", []), ("Hallway", []), ("Dining Room", []), ("Kids Room", []), ("Guest Room", []),
         ("Garage", []), ("Garden", ["Backyard"]), ("Laundry Room", []), ("Porch", [])]
# (domain, name pattern, state, attributes): in the order a home grows; per kind, area by area.
KINDS = [
    ("light", "{a} Light", "on", {"brightness": "180"}),
    ("sensor", "{a} Temperature", "21.5", {"unit_of_measurement": "°C", "device_class": "temperature"}),
    ("switch", "{a} Outlet", "off", {"device_class": "outlet"}),
    ("binary_sensor", "{a} Motion", "off", {"device_class": "motion"}),
    ("sensor", "{a} Humidity", "48", {"unit_of_measurement": "%", "device_class": "humidity"}),
    ("light", "{a} Lamp", "off", {}),
    ("cover", "{a} Blinds", "open", {"current_position": "100", "device_class": "blind"}),
    ("media_player", "{a} Speaker", "idle", {"volume_level": 0.35, "device_class": "speaker"}),
    ("climate", "{a} Thermostat", "heat", {"current_temperature": "20.5", "temperature": "21"}),
    ("binary_sensor", "{a} Window", "off", {"device_class": "window"}),
    ("fan", "{a} Fan", "off", {"percentage": "0"}),
    ("sensor", "{a} Power", "35.2", {"unit_of_measurement": "W", "device_class": "power"}),
]
HOUSE = [("lock", "Front Door", ["Front Door Lock"], "Hallway", "locked", {}),
         ("todo", "Shopping List", [], None, "3", {}),
         ("weather", "Forecast Home", ["Weather"], None, "rainy",
          {"temperature": "12.3", "temperature_unit": "°C", "humidity": "87"}),
         ("vacuum", "Robot Vacuum", ["Roomba"], "Hallway", "docked", {}),
         ("cover", "Garage Door", [], "Garage", "closed", {"current_position": "0", "device_class": "garage"}),
         ("lock", "Back Door", [], "Kitchen", "locked", {})]


def home(n: int) -> list[dict[str, Any]]:
    """The first n entities of the home as HA keeps them, sorted by name as _get_exposed_entities reads them. A
    home grows as: a lock, a to-do list and the weather, then the lights, temperatures and outlets area by area,
    the other house-wide devices, and the rest of the kinds."""
    house = [{"domain": d, "names": ", ".join([name, *aliases]), "area": area, "state": s, "attributes": at}
             for d, name, aliases, area, s, at in HOUSE]
    rooms = [{"domain": d, "names": pattern.format(a=area), "area": area, "state": s, "attributes": at}
             for d, pattern, s, at in KINDS for area, _aliases in AREAS]
    order = house[:3] + rooms[:40] + house[3:] + rooms[40:]
    if n > len(order):
        raise SystemExit(f"the sample home has {len(order)} entities; ask for at most that many")
    return sorted(order[:n], key=lambda e: e["names"])


def record(entity: dict[str, Any], with_state: bool) -> dict[str, Any]:
    """_get_exposed_entities' info dict: names, domain, (state), areas, (attributes) in this order."""
    info: dict[str, Any] = {"names": entity["names"], "domain": entity["domain"]}
    if with_state:
        info["state"] = entity["state"]
    if entity["area"]:
        aliases = dict(AREAS).get(entity["area"], [])
        info["areas"] = ", ".join([entity["area"], *aliases])
    if with_state and entity["attributes"]:
        info["attributes"] = dict(entity["attributes"])  # one dict per entity, as HA builds them (no YAML anchors)
    return info


def ha_yaml(data: Any) -> str:
    """homeassistant.util.yaml.dump: block style, unicode kept, keys in insertion order, null left empty."""
    return yaml.safe_dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False).replace(": null\n",
                                                                                                       ":\n")


def system_prompt(entities: list[dict[str, Any]], with_api: bool = True, now: datetime | None = None) -> str:
    if not with_api:  # no LLM API selected: the date and time close the system message, to the second
        now = now or datetime.now()
        return DEFAULT_INSTRUCTIONS_PROMPT + "\n" + DATE_TIME_PROMPT.format(time=now.strftime("%H:%M:%S"),
                                                                            date=now.strftime("%Y-%m-%d"))
    static = [ha_yaml([record(e, with_state=False) for e in entities if e["domain"] != "script"])]
    api = "\n".join([DEVICE_CONTROL_TOOL_USAGE_PROMPT, AREA_PROMPT_NO_DEVICE, NO_TIMER_PROMPT, DYNAMIC_CONTEXT_PROMPT,
                     "Static Context: An overview of the areas and the devices in this smart home:", *static])
    return DEFAULT_INSTRUCTIONS_PROMPT + "\n" + api


def live_context(entities: list[dict[str, Any]]) -> str:
    """GetLiveContext's result, as the tool message content the Ollama integration sends."""
    result = "\n".join(["Live Context: An overview of the areas and the devices in this smart home:",
                        ha_yaml([record(e, with_state=True) for e in entities])])
    return json.dumps({"data": {"success": True, "result": result}, "error": False}, ensure_ascii=False,
                      separators=(",", ":"))


# --- the tools ---------------------------------------------------------------------------------------------------
STR = {"type": "string"}
STRS = {"type": "array", "items": {"type": "string"}}
DEVICE_CLASSES = ["awning", "blind", "curtain", "damper", "door", "garage", "gas", "gate", "identify", "outlet",
                  "projector", "receiver", "restart", "shade", "shutter", "speaker", "switch", "tv", "update", "water",
                  "window"]
TARGET = {"area": STR, "device_class": {"items": {"enum": DEVICE_CLASSES, "type": "string"}, "type": "array"},
          "domain": STRS, "floor": STR, "name": STR}
NAMED = {"area": STR, "floor": STR, "name": STR}
PCT = {"type": "integer", "minimum": 0, "maximum": 100}
TURN_ON = ("Turns on/opens/presses a device or entity. For locks, this performs a 'lock' action. Use for requests "
           "like 'turn on', 'activate', 'enable', or 'lock'.")
TURN_OFF = ("Turns off/closes a device or entity. For locks, this performs an 'unlock' action. Use for requests like "
            "'turn off', 'deactivate', 'disable', or 'unlock'.")
LIVE = ("Provides real-time information about the CURRENT state, value, or mode of devices, sensors, entities, or "
        "areas. Use this tool for: 1. Answering questions about current conditions (e.g., 'Is the light on?'). "
        "2. As the first step in conditional actions (e.g., 'If the weather is rainy, turn off sprinklers' requires "
        "checking the weather first). You may filter for devices by name, domain, and area, including combining "
        "those filters. Prefer filtering by domain when searching for multiple devices of the same type.")
LIST_ITEM = {"item": STR, "name": STR}
# (name, description, properties, required, the exposed domains that bring it; None: always)
INTENTS = [
    ("HassTurnOn", TURN_ON, TARGET, [], None),
    ("HassTurnOff", TURN_OFF, TARGET, [], None),
    ("HassCancelAllTimers", "Cancels all timers", {"area": STR}, [], None),
    ("HassLock", "Locks a lock. Use for requests like 'lock the front door'.", {**NAMED, "domain": STRS}, [],
     {"lock"}),
    ("HassUnlock", "Unlocks a lock. Use for requests like 'unlock the back door'.", {**NAMED, "domain": STRS}, [],
     {"lock"}),
    ("HassOpen", "Opens a cover or valve, such as a blind, curtain, garage door or water valve.", TARGET, [],
     {"cover", "valve"}),
    ("HassClose", "Closes a cover or valve, such as a blind, curtain, garage door or water valve.", TARGET, [],
     {"cover", "valve"}),
    ("HassSetPosition", "Sets the position of a device or entity", {**TARGET, "position": PCT}, ["position"],
     {"cover", "valve"}),
    ("HassStopMoving", "Stops a moving device or entity", TARGET, [], {"cover", "valve"}),
    ("HassLightSet", "Sets the brightness percentage or color of a light",
     {**NAMED, "domain": {"type": "array", "items": {"type": "string", "enum": ["light"]}},
      "brightness": {**PCT, "description": "The brightness percentage of the light between 0 and 100, where 0 is "
                                           "off and 100 is fully lit"},
      "color": STR, "temperature": {"type": "integer", "minimum": 0}}, [], {"light"}),
    ("HassClimateSetTemperature", "Sets the target temperature of a climate device or entity",
     {**NAMED, "temperature": {"type": "number"}}, ["temperature"], {"climate"}),
    ("HassFanSetSpeed", "Sets a fan's speed by percentage", {**NAMED, "percentage": PCT}, ["percentage"], {"fan"}),
    ("HassMediaPause", "Pauses a media player", TARGET, [], {"media_player"}),
    ("HassMediaUnpause", "Resumes a media player", TARGET, [], {"media_player"}),
    ("HassMediaNext", "Skips a media player to the next item", TARGET, [], {"media_player"}),
    ("HassMediaPrevious", "Replays the previous item for a media player", TARGET, [], {"media_player"}),
    ("HassSetVolume", "Sets the volume percentage of a media player", {**TARGET, "volume_level": PCT},
     ["volume_level"], {"media_player"}),
    ("HassVacuumStart", "Starts a vacuum", NAMED, [], {"vacuum"}),
    ("HassVacuumReturnToBase", "Returns a vacuum to base", NAMED, [], {"vacuum"}),
    ("HassListAddItem", "Add item to a todo list", LIST_ITEM, ["item", "name"], {"todo"}),
    ("HassListCompleteItem", "Complete item on a todo list", LIST_ITEM, ["item", "name"], {"todo"}),
    ("HassListRemoveItem", "Remove one or more items from a todo list", LIST_ITEM, ["item", "name"], {"todo"}),
]


def ha_tools(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools the Ollama integration sends, in the order llm.py makes them."""
    domains = {e["domain"] for e in entities}

    def tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": properties, "required": required}, "description": description}}

    tools = [tool(name, description, props, required) for name, description, props, required, platforms in INTENTS
             if platforms is None or platforms & domains]
    tools.append(tool("GetDateTime", "Provides the current date and time.", {}, []))
    if "todo" in domains:
        lists = [name for e in entities if e["domain"] == "todo" for name in e["names"].split(", ")]
        tools.append(tool("todo_get_items", "Query a to-do list to find out what items are on it. Use this to answer "
                          "questions like 'What's on my task list?' or 'Read my grocery list'. Filters items by status "
                          "(needs_action, completed, all).", {
                              "status": {"default": "needs_action", "description": "Filter returned items by status, "
                                         "by default returns incomplete items",
                                         "enum": ["all", "completed", "needs_action"], "type": "string"},
                              "todo_list": {"enum": lists, "type": "string"}}, ["todo_list"]))
    tools.append(tool("GetLiveContext", LIVE, {
        "area": {"description": "Filter entities by area name or alias (case-insensitive).", "type": "string"},
        "domain": {"anyOf": [{}, STRS], "description": "Filter entities by domain (e.g. 'light', 'sensor'). Accepts a "
                   "single domain or a list."},
        "name": {"description": "Filter entities by name or alias (case-insensitive).", "type": "string"}}, []))
    return tools


# --- counting in our tokens ----------------------------------------------------------------------------------------
def specs(tools: list[dict[str, Any]]) -> tuple[ToolSpec, ...]:
    return tuple(ToolSpec(t["function"]["name"], t["function"].get("description", ""), t["function"]["parameters"])
                 for t in tools)


def counters() -> dict[str, Any]:
    """name -> (template, tokenize): the Llama-3.2 tokenizer and template, and the embedded SmolLM2."""
    from conftest import llama_tokenizer_dir
    from tokenizers import Tokenizer

    from edge_llama.config import EngineConfig
    from edge_llama.engine.base import tokenizer_config_info
    from edge_llama.engine.llamacpp import LlamaCppEngine
    from edge_llama.prompting.template import template_for

    folder = llama_tokenizer_dir()
    special, plain = (Tokenizer.from_file(str(folder / "tokenizer.json")) for _ in range(2))
    plain.encode_special_tokens = True

    def llama_tokenize(text: str, parse_special: bool = True) -> list[int]:
        return (special if parse_special else plain).encode(text, add_special_tokens=False).ids

    smol = LlamaCppEngine(EngineConfig(kv_tokens=512))
    smol.load()
    return {"llama3.2": (template_for(None, tokenizer_config_info(folder / "tokenizer_config.json")), llama_tokenize),
            "smollm2": (template_for(None, smol.template_info), smol.tokenize)}


def count(counter: Any, messages: list[Message], tools: tuple[ToolSpec, ...]) -> int:
    template, tokenize = counter
    return len(template.tokenize(messages, tokenize, tools=tools, date_string="26 Jul 2026"))


def budget(tokens: int) -> int:
    """The smallest of the usual engine.kv_tokens settings that holds `tokens` plus the reply reserve."""
    return next((kv for kv in (1024, 2048, 4096, 8192, 16384, 32768) if tokens + RESERVE <= kv), -1)


def measure(n: int, counters_: dict[str, Any]) -> dict[str, Any]:
    entities = home(n)
    system, tools = system_prompt(entities), specs(ha_tools(entities))
    first = [Message("system", system), Message("user", "Turn on the kitchen light.")]
    call = ToolCall("call_1", "GetLiveContext", {"domain": "sensor"})
    live = first[:1] + [Message("user", "What is the temperature in the office?"),
                        Message("assistant", "", (call,)), Message("tool", live_context(entities), (), "call_1")]
    out: dict[str, Any] = {"entities": n, "tools": len(tools), "system_chars": len(system)}
    for name, counter in counters_.items():
        turn, with_live = count(counter, first, tools), count(counter, live, tools)
        out[name] = {"system_only": count(counter, first[:1] + [Message("user", "hi")], ()),
                     "first_turn": turn, "with_live_context": with_live,
                     "needed_kv": budget(turn), "needed_kv_live": budget(with_live)}
    return out


def most_entities(counter: Any, kv_tokens: int) -> int:
    """How many entities fit a KV budget with the GetLiveContext round (the larger of the two prompts)."""
    fits = 0
    for n in range(1, len(home_catalog()) + 1):
        entities = home(n)
        live = [Message("system", system_prompt(entities)), Message("user", "Is the garage door open?"),
                Message("assistant", "", (ToolCall("c", "GetLiveContext", {}),)),
                Message("tool", live_context(entities), (), "c")]
        if count(counter, live, specs(ha_tools(entities))) + RESERVE > kv_tokens:
            break
        fits = n
    return fits


def home_catalog() -> list[dict[str, Any]]:
    return home(len(AREAS) * len(KINDS) + len(HOUSE))  # every entity of the sample home


def prefix_stability(counter: Any) -> dict[str, Any]:
    """HA without an LLM API ends its system message with the time, to the second: two turns a few seconds apart
    share only the tokens before it. With the Assist API the system message has no time (GetDateTime is a tool)."""
    template, tokenize = counter
    now = datetime(2026, 7, 26, 20, 15, 3)

    def ids(at: datetime) -> list[int]:
        history = [Message("system", system_prompt([], with_api=False, now=at)), Message("user", "Tell me a joke."),
                   Message("assistant", "Why did the robot go on vacation? It needed to recharge."),
                   Message("user", "Another one.")]
        return template.tokenize(history, tokenize, date_string="26 Jul 2026")

    a, b = ids(now), ids(now + timedelta(seconds=7))
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return {"no_api_prompt_tokens": len(b), "no_api_common_prefix_tokens": common}


# --- the daemon: first-token time, cold against a cached prefix ----------------------------------------------------
def daemon_run(entity_counts: list[int], reps: int) -> dict[str, Any]:
    import httpx
    import ollama

    from edge_llama.launch import DaemonProcess

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="elha", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "config.yaml").write_text(yaml.safe_dump({
            "engine": {"kv_tokens": 8192}, "safety": {"enabled": False}, "server": {"state_dir": str(work / "s")}}))
        with DaemonProcess(work / "d.sock", ["--config", str(work / "config.yaml")], log=work / "daemon.log") as d:
            d.wait_ready(timeout=120)
            client = ollama.Client(host="http://localhost", transport=httpx.HTTPTransport(uds=str(d.socket)),
                                   timeout=600)
            model = client.list().models[0].model

            def turn(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> tuple[float, int]:
                """The first-token time (ms) and prompt tokens of one turn. One token is generated: the prompt's
                evaluation is what is measured, not the answer (a started tool call would be constrained)."""
                parts = list(client.chat(model=model, messages=messages, tools=tools, stream=True, keep_alive=-1,
                                         options={"num_ctx": 8192, "num_predict": 1, "temperature": 0}))
                return parts[-1].prompt_eval_duration / 1e6, parts[-1].prompt_eval_count

            for n in entity_counts:
                entities = home(n)
                tools = ha_tools(entities)
                rows: list[dict[str, float]] = []
                for rep in range(reps):
                    # The llama.cpp backend keeps the last prompt's KV cells: each turn below follows the one whose
                    # prompt it extends. Cold: a system prompt no turn has used (HA's own after a line naming the
                    # repetition). Follow-up: the next turn of that conversation, as the Ollama integration sends it
                    # (the whole history). New conversation: another Assist request, same system prompt and tools.
                    system = {"role": "system", "content": f"Session {n}-{rep}.\n" + system_prompt(entities)}
                    first = [system, {"role": "user", "content": "Turn on the kitchen light."}]
                    cold_ms, prompt_tokens = turn(first, tools)
                    follow_ms, _ = turn([*first, {"role": "assistant", "content": "The kitchen light is on."},
                                         {"role": "user", "content": "And turn off the office light."}], tools)
                    new_ms, _ = turn([system, {"role": "user", "content": "What is the temperature in the office?"}],
                                     tools)
                    rows.append({"cold_ms": cold_ms, "follow_up_ms": follow_ms, "new_conversation_ms": new_ms,
                                 "prompt_tokens": prompt_tokens})
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                results[str(n)] = {**{k: round(v, 1) for k, v in med.items()},
                                   "new_conversation_ratio": round(med["new_conversation_ms"] / med["cold_ms"], 3),
                                   "follow_up_ratio": round(med["follow_up_ms"] / med["cold_ms"], 3), "reps": reps}
                print(f"  {n} entities: {results[str(n)]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, nargs="+", default=[10, 50, 150])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-daemon", action="store_true", help="count tokens only")
    args = parser.parse_args()

    counters_ = counters()
    sizes = [measure(n, counters_) for n in args.entities]
    for row in sizes:
        print(json.dumps(row))
    summary: dict[str, Any] = {
        "sizes": sizes,
        "max_entities_kv4096": {name: most_entities(c, 4096) for name, c in counters_.items()},
        "max_entities_kv8192": {name: most_entities(c, 8192) for name, c in counters_.items()},
        "prefix_llama3.2": prefix_stability(counters_["llama3.2"]),
    }
    print(f"fits engine.kv_tokens 4096 with a GetLiveContext round: {summary['max_entities_kv4096']} entities")
    if not args.no_daemon:
        fitting = [n for n in args.entities
                   if next(s for s in sizes if s["entities"] == n)["smollm2"]["first_turn"] + RESERVE <= 8192]
        print(f"daemon (embedded SmolLM2, kv_tokens 8192): first-token time, entities {fitting}", flush=True)
        summary["prefix_reuse"] = daemon_run(fitting, args.reps)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
