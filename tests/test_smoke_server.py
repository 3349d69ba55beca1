import requests


def test_seed_curl_shape(server):
    r = requests.post(server.url, json={"prompt": "Hello, who are you?", "max_new_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"response", "status", "time"}
