"""`wisp.v1` changes only by addition: a recorded list of every field, enum value and method must stay true.

New fields take new numbers; none is renumbered, reused, retyped or removed, so an edge built against an
older `wisp.v1` keeps working against a newer server (docs/protocol.md). After adding to the .proto (and
`make proto`), record the additions with ``python tests/test_protocol_contract.py --record``: it adds new
entries to tests/data/wisp_v1_contract.json and never changes a recorded one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb

RECORD = Path(__file__).parent / "data" / "wisp_v1_contract.json"


def field_entry(field: FieldDescriptor) -> dict:
    """What an old peer relies on: the number, the wire type, repeated or not, the message or enum type, the oneof."""
    return {
        "number": field.number,
        "type": field.type,
        "repeated": field.is_repeated,
        "type_name": (field.message_type or field.enum_type).full_name if field.message_type or field.enum_type else "",
        "oneof": field.containing_oneof.name if field.containing_oneof else "",
    }


def contract() -> dict[str, dict]:
    """Every message field, enum value and RPC of the current `wisp.v1`, by full name."""
    entries: dict[str, dict] = {}

    def messages(descriptor):
        yield descriptor
        for nested in descriptor.nested_types:
            yield from messages(nested)

    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for descriptor in messages(message):
            for field in descriptor.fields:
                entries[field.full_name] = field_entry(field)
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        for value in enum.values:
            entries[f"{enum.full_name}.{value.name}"] = {"number": value.number}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            entries[method.full_name] = {
                "input": method.input_type.full_name,
                "output": method.output_type.full_name,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
    return entries


def broken_promises(recorded: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """What changed or disappeared, and numbers that a new name took from a recorded one."""
    problems = [f"{name} disappeared" for name in recorded if name not in current]
    problems += [
        f"{name} changed: {recorded[name]} -> {current[name]}"
        for name in recorded
        if name in current and current[name] != recorded[name]
    ]
    taken = {(name.rsplit(".", 1)[0], entry["number"]): name for name, entry in recorded.items() if "number" in entry}
    for name, entry in current.items():
        owner = taken.get((name.rsplit(".", 1)[0], entry.get("number")))
        if name not in recorded and owner is not None:
            problems.append(f"{name} reuses number {entry['number']} of {owner}")
    return problems


def test_no_recorded_field_enum_value_or_method_changes_or_disappears():
    problems = broken_promises(json.loads(RECORD.read_text()), contract())
    assert not problems, "wisp.v1 changes only by addition (docs/protocol.md):\n" + "\n".join(problems)


def test_every_field_is_recorded_so_that_it_is_protected_too():
    unrecorded = sorted(set(contract()) - set(json.loads(RECORD.read_text())))
    assert not unrecorded, f"record the additions: python tests/test_protocol_contract.py --record ({unrecorded})"


def test_the_check_catches_a_renumbered_retyped_removed_or_reused_field():
    recorded = contract()
    current = json.loads(json.dumps(recorded))
    current["wisp.v1.DraftRound.position"]["number"] = 9
    current["wisp.v1.Verdict.num_accepted"]["type"] = FieldDescriptor.TYPE_STRING
    del current["wisp.v1.OpenSession.prompt_token_ids"]
    current["wisp.v1.Hints.something_new"] = {**recorded["wisp.v1.Hints.active_sessions"]}
    problems = broken_promises(recorded, current)
    assert len(problems) == 4, problems


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    old = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    RECORD.write_text(json.dumps({**contract(), **old}, indent=1, sort_keys=True) + "\n")
    print(f"{RECORD}: {len(contract()) - len(set(contract()) & set(old))} entries added")
