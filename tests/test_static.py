"""The browser client and the demo page: plain ES5, served with the right
headers and caching."""

from __future__ import annotations

import re

import esprima
import pytest
import webtest
from conftest import make_settings

from service.app import create_app
from service.web import assets as static

SCRIPTS = ["livecomments.js", "demo.js", "demo-many.js"]

#: Syntax that is not ES5 (what an ES2017 parser accepts beyond it).
NOT_ES5 = {
    "ArrowFunctionExpression", "TemplateLiteral", "TaggedTemplateExpression",
    "ClassDeclaration", "ClassExpression", "ForOfStatement", "SpreadElement",
    "RestElement", "AssignmentPattern", "ObjectPattern", "ArrayPattern", "AwaitExpression",
    "YieldExpression", "ImportDeclaration", "ExportNamedDeclaration", "MetaProperty",
    "Super",
}
#: APIs old browsers lack; the client must not need them.
NOT_IN_OLD_BROWSERS = {"fetch", "Promise", "Symbol", "Map", "Set", "WeakMap", "Proxy",
                       "Reflect"}


def es5_violations(source):
    """What in ``source`` is not ES5, as readable strings (empty if none)."""
    found = []

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind in NOT_ES5:
            found.append(kind)
        if kind == "VariableDeclaration" and node["kind"] != "var":
            found.append(f"{node['kind']} declaration")
        if kind in ("FunctionDeclaration", "FunctionExpression") and (
                node.get("async") or node.get("generator")):
            found.append("async or generator function")
        if kind == "Property" and (node.get("shorthand") or node.get("method")
                                   or node.get("computed")):
            found.append("ES2015 object literal")
        if kind == "Identifier" and node["name"] in NOT_IN_OLD_BROWSERS:
            found.append(node["name"])
        for value in node.values():
            walk(value)

    walk(esprima.parseScript(source).toDict())
    return found


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_plain_es5(name):
    source = (static.STATIC_DIR / name).read_text()
    assert es5_violations(source) == []
    assert "innerHTML" not in source and "insertAdjacentHTML" not in source
    assert "document.write" not in source and "eval(" not in source


def test_the_es5_check_catches_newer_syntax():
    newer = ("var a = () => 1; let b = `x`; class C {}; fetch('/'); const c = 1; "
             "new Promise(function () {}); for (var x of y) {} var o = {m() {}}; "
             "function f(a = 1) {} var {p} = q; async function g() {}")
    assert set(es5_violations(newer)) >= {
        "ArrowFunctionExpression", "TemplateLiteral", "ClassDeclaration", "fetch",
        "const declaration", "let declaration", "Promise", "ForOfStatement",
        "ES2015 object literal", "AssignmentPattern", "ObjectPattern",
        "async or generator function",
    }


@pytest.fixture
def client(make_store, sqlite_url):
    app = create_app(make_settings(sqlite_url), store=make_store(sqlite_url))
    yield webtest.TestApp(app)
    app.close()


def test_client_script_is_served_with_an_etag(client):
    answer = client.get("/static/livecomments.js")
    assert answer.content_type == "application/javascript"
    assert answer.headers["Cache-Control"] == "no-cache"
    etag = answer.headers["ETag"]
    assert b"LiveComments" in answer.body
    again = client.get("/static/livecomments.js", headers={"If-None-Match": etag}, status=304)
    assert again.body == b""
    versioned = client.get("/static/livecomments.js?v=" + etag.strip('"'))
    assert "immutable" in versioned.headers["Cache-Control"]
    assert "max-age=31536000" in versioned.headers["Cache-Control"]


@pytest.mark.parametrize("name", ["../settings.py", "demo.html", "nope.js", "..%2Fapp.py"])
def test_only_the_client_files_are_served(client, name):
    assert client.get("/static/" + name, status=404).json["code"] == "not_found"


@pytest.mark.parametrize("path", ["/", "/demo/42"])
def test_demo_page_names_versioned_scripts_under_a_strict_policy(client, path):
    answer = client.get(path)
    assert answer.content_type == "text/html"
    policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    scripts = re.findall(r'<script src="([^"]+)"', answer.text)
    assert [s.split("?")[0] for s in scripts] == [f"/static/{name}" for name in SCRIPTS]
    for src in scripts:
        script = client.get(src)
        assert "immutable" in script.headers["Cache-Control"]
    assert "<script>" not in answer.text  # nothing inline


def test_demo_page_refuses_a_bad_content_id(client):
    assert client.get("/demo/abc", status=400).json["code"] == "invalid_request"
