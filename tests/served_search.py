"""Search a served table by text for every question of a JSON file, as a user would in a fresh
process: `import embedtune` (registers the table's embedding function) and LanceDB, nothing else.

    python tests/served_search.py DB_URI TABLE QUESTIONS_JSON

QUESTIONS_JSON: {"questions": [...], "only_ids": [...] (optional: search only these rows)}.
Prints JSON: the top-10 ids per question, a hybrid search's ids and the table's embedding functions.
"""

from __future__ import annotations

import json
import sys

import lancedb

import embedtune  # noqa: F401  (registers the `embedtune` embedding function the table names)


def main() -> None:
    uri, name, qfile = sys.argv[1:4]
    asked = json.loads(open(qfile).read())
    tbl = lancedb.connect(uri).open_table(name)
    where = None
    if asked.get("only_ids"):
        where = "id IN (" + ", ".join(f"'{i}'" for i in asked["only_ids"]) + ")"
    ranked = []
    for q in asked["questions"]:
        query = tbl.search(q).limit(10)
        if where:
            query = query.where(where, prefilter=True)
        ranked.append([r["id"] for r in query.to_list()])
    hybrid = tbl.search(asked["questions"][0], query_type="hybrid").limit(5).to_list()
    out = {
        "ranked": ranked,
        "hybrid": [r["id"] for r in hybrid],
        "rows": tbl.count_rows(),
        "functions": json.loads(tbl.schema.metadata[b"embedding_functions"]),
        "meta": {
            k.decode(): v.decode() for k, v in tbl.schema.metadata.items() if k.startswith(b"embedtune.")
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
