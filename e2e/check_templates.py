#!/usr/bin/env python3
"""Renders every template of the live Home Assistant discovery documents with Jinja2
(the engine Home Assistant's templates are), against the live retained documents they
read, and checks what comes out the way Home Assistant would take it.

Usage: check_templates.py DISCOVERY_DUMP STATE_DUMP
  DISCOVERY_DUMP  `mosquitto_sub -v -t 'homeassistant/device/+/config'` output
  STATE_DUMP      `mosquitto_sub -v -t 'fleet/+/state' -t fleet/estop` output (robots,
                  the gateway's summary, the latch), one `topic payload` per line

Home Assistant adds filters of its own; the two the documents use are defined here as
Home Assistant documents them: `timestamp_custom(format, local)` and `tojson`/`int`
(built into Jinja2). Exit status 1 and one line per problem when anything is off.
"""

import datetime
import json
import sys

import jinja2
import jinja2.sandbox


def timestamp_custom(value, fmt, local=True):
    moment = datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
    if local:
        moment = moment.astimezone()
    return moment.strftime(fmt)


def read_dump(path):
    """Topic -> payload text, from `mosquitto_sub -v` lines."""
    documents = {}
    with open(path, encoding="utf-8") as dump:
        for line in dump:
            topic, _, payload = line.rstrip("\n").partition(" ")
            documents[topic] = payload
    return documents


def variables(payload):
    """What Home Assistant gives a template: `value`, and `value_json` when it parses."""
    try:
        return {"value": payload, "value_json": json.loads(payload)}
    except ValueError:
        return {"value": payload}


def main():
    devices = {t: json.loads(p) for t, p in read_dump(sys.argv[1]).items()}
    states = read_dump(sys.argv[2])
    env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    env.filters["timestamp_custom"] = timestamp_custom
    problems = []
    rendered = 0

    def render(where, template, **variables):
        nonlocal rendered
        try:
            out = env.from_string(template).render(**variables)
        except Exception as error:  # any failure is what Home Assistant would log
            problems.append(f"{where}: {template!r}: {error}")
            return None
        rendered += 1
        return out

    for config_topic, document in sorted(devices.items()):
        for key, component in document.get("components", {}).items():
            where = f"{config_topic} {key}"
            state_topic = component.get("state_topic")
            attributes_topic = component.get("json_attributes_topic")
            for field, topic in [
                ("value_template", state_topic),
                ("state_value_template", state_topic),
                ("json_attributes_template", attributes_topic),
            ]:
                template = component.get(field)
                if template is None:
                    continue
                # No retained message (the latch never engaged): an empty payload, as
                # Home Assistant renders a deleted retained message.
                payload = states.get(topic, "")
                out = render(f"{where} {field}", template, **variables(payload))
                if out is None:
                    continue
                platform = component["platform"]
                if field == "json_attributes_template":
                    if not isinstance(json.loads(out), dict):
                        problems.append(f"{where}: attributes {out!r} are not an object")
                elif platform == "light" and out not in (
                    component.get("payload_on", "ON"),
                    component.get("payload_off", "OFF"),
                ):
                    problems.append(f"{where}: light state {out!r} is neither payload")
                elif platform == "binary_sensor" and out not in ("ON", "OFF"):
                    problems.append(f"{where}: binary sensor state {out!r}")
                elif platform == "number":
                    value = float(out)
                    if not component["min"] <= value <= component["max"]:
                        problems.append(f"{where}: {value} outside min..max")
                elif component.get("device_class") == "timestamp":
                    moment = datetime.datetime.fromisoformat(out)
                    if moment.tzinfo is None:
                        problems.append(f"{where}: timestamp {out!r} has no time zone")
                    age = datetime.datetime.now(datetime.timezone.utc) - moment
                    if abs(age.total_seconds()) > 600:
                        problems.append(f"{where}: timestamp {out!r} is {age} away")
                elif platform == "select" and out not in component["options"] + ["None"]:
                    problems.append(f"{where}: select state {out!r} is not an option")
            template = component.get("command_template")
            if template is not None:
                # A number entity renders its command template with `value` a float.
                out = render(f"{where} command_template", template, value=70.0)
                if out is not None and out != "70%":
                    problems.append(f"{where}: command template gave {out!r}")

    for problem in problems:
        print(problem)
    print(f"{len(devices)} documents, {rendered} templates rendered, {len(problems)} problems")
    return 1 if problems or not rendered else 0


if __name__ == "__main__":
    sys.exit(main())
