def test_post_then_read(client, token):
    resp = client.post_json("/contents/3/comments", {"body": "hi"}, headers={"Authorization": token(5)})
    assert resp.status_int == 201
    page = client.get("/contents/3/comments").json
    assert [c["body"] for c in page["comments"]] == ["hi"]
    assert page["cursor"] == 1
