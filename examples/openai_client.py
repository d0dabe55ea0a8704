"""The moe-qos server through the official `openai` client: a chat answer and a streamed completion.

    python examples/openai_client.py [--url http://127.0.0.1:8000/v1] [--key sk-interactive-change-me]
"""

import argparse

import openai

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--key", default="sk-interactive-change-me", help="an API key of the SLO file")
parser.add_argument("--model", default="tiny-random")
args = parser.parse_args()

client = openai.OpenAI(base_url=args.url, api_key=args.key)
reply = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=16)
print("chat:", repr(reply.choices[0].message.content), reply.usage.completion_tokens, "tokens,",
      "plans", reply.model_extra["qos"]["plan_ids"])
print("stream: ", end="")
for chunk in client.completions.create(model=args.model, prompt="The market", max_tokens=16, stream=True):
    print(chunk.choices[0].text, end="", flush=True)
print()
