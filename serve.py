"""
Ask one or two checkpoints about a picture in the browser and watch their answers stream side by
side: say the toy sweep's branches that first saw images at 0.0 and at 0.8 of pretraining.

    python serve.py --ckpt=out/toy_sft/ckpt.pt                              # open http://127.0.0.1:8000/
    python serve.py --ckpt=out/toy_sft/ckpt.pt --ckpt_b=out/toy/ckpt.pt     # two columns

The page uploads a picture (any file Pillow opens) or picks one of the toy world's held-out
scenes, and sends each question to every checkpoint; each answer streams into its checkpoint's
column token by token (server-sent events). The picture, the prompt and the generation are
sample.py's (both use chat.py), so a greedy answer here is the one sample.py prints for the same
checkpoint, picture and question. A fine-tuned checkpoint holds a conversation (earlier turns in
its context, the oldest dropped first when it is full); a pretrained one continues each prompt
on its own, and an empty prompt after a picture makes it caption the picture. Greedy by
default; the page sets temperature, top_k, the seed and the answer's length.

The standard library's HTTP server, one thread per request, and one lock per checkpoint: its
requests are answered one at a time, in turn, while the other checkpoint answers beside them.
The server keeps no state between requests: the page sends the picture and the conversation
with every question. A bad request (not a picture, a picture over max_upload_mb, a picture for
a checkpoint that never saw one, a question the checkpoint cannot encode or fit) gets its
message in the page, and the server carries on. It listens on 127.0.0.1 unless host says
otherwise: whoever reaches the port can make the machine generate. For a server that runs for
long, MALLOC_ARENA_MAX=2 keeps its memory flat (glibc's default arenas for the request threads
grow it by some MiB over hundreds of questions; docs/ask.md).
"""

import base64
import binascii
import contextlib
import io
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import torch
from PIL import Image

import chat
from common import autocast_context, resolve_device
from configurator import apply_overrides
from data.errors import UserError, report_user_errors
from inference import load_model

# -----------------------------------------------------------------------------
ckpt = "out/toy_sft/ckpt.pt"
ckpt_b = ""  # a second checkpoint, answering in a column of its own beside ckpt's; "" = one column
data_dir = "data/toyworld"  # the toy world whose held-out scenes the page offers
host = "127.0.0.1"
port = 8000  # 0 = any free port (the address is printed)
max_new_tokens = 64  # the page's defaults for generation, which it can change per question
temperature = 0.0  # 0 = greedy
top_k = 0  # > 0: sample from the k likeliest tokens only
seed = 1337
max_upload_mb = 8.0  # a larger picture file is refused
device = "auto"
dtype = "bfloat16"
# -----------------------------------------------------------------------------

GENERATION = ("max_new_tokens", "temperature", "top_k", "seed")


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /info (the checkpoints and defaults), GET /scene/N.png (a toy
    scene), POST /ask (a JSON question for one column; the answer as server-sent events)."""
    columns = []  # per checkpoint: path, model, tokenizer, fine_tuned, saw_images, lock (set by main)
    settings = {}
    toy_scene_captions = []
    timeout = 60  # a client that stops sending mid-request frees its thread after this many seconds

    def do_GET(self):
        path = urlparse(self.path).path
        if path == "/":
            self.send_body(200, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/info":
            self.send_json(200, self.info())
        elif path.startswith("/scene/") and path.endswith(".png") and path[7:-4].isdigit():
            try:
                scene, _ = chat.toy_scene(self.settings["data_dir"], int(path[7:-4]))
            except UserError as e:
                self.send_json(404, {"error": str(e)})
                return
            png = io.BytesIO()
            Image.fromarray(scene).save(png, format="PNG")
            self.send_body(200, "image/png", png.getvalue())
        else:
            self.send_json(404, {"error": f"no page {path}"})

    def do_POST(self):
        try:
            if urlparse(self.path).path != "/ask":
                raise UserError(f"no such address: POST {self.path} (questions go to POST /ask)")
            column, ids, picture, stop_id, generation = self.prepare(self.read_json())
        except UserError as e:
            self.send_json(400, {"error": str(e)})
            return
        except (TimeoutError, ConnectionError):
            return  # the client stopped sending, or hung up, in the middle of its question
        except Exception:  # a bug: its traceback in the server's log, a message in the page, and carry on
            traceback.print_exc()
            self.send_json(500, {"error": "the server failed on this question (its log has why)"})
            return
        self.stream_answer(column, ids, picture, stop_id, generation)

    def info(self):
        s = self.settings
        return {
            "columns": [{"name": c["path"], "fine_tuned": c["fine_tuned"], "saw_images": c["saw_images"]}
                        for c in self.columns],
            "toy_scenes": self.toy_scene_captions,
            "defaults": {k: s[k] for k in GENERATION},
            "max_upload_bytes": int(s["max_upload_mb"] * 2**20),
        }

    def read_json(self):
        """The request's JSON body. One over the size limit is read and dropped (so that the
        client, still sending, gets the answer) unless it is far over."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise UserError("a question needs a Content-Length header")
        size, limit_mb = int(length), self.settings["max_upload_mb"]
        limit = int(limit_mb * 2**20) * 4 // 3 + 2**20  # the picture in base64, and the rest
        if size > limit:
            left = size if size <= 8 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 2**20))
                left = left - len(chunk) if chunk else 0
            raise UserError(f"the question is {size:,} bytes, more than one with a picture of {limit_mb:g} MB "
                            "(the server's max_upload_mb) needs")
        try:
            return json.loads(self.rfile.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"the question is not valid JSON ({e})") from None

    def prepare(self, request):
        """The checked request: its column, the prompt's ids, the picture, the stop token and
        the generation settings. Raises a UserError for anything a page or client got wrong."""
        s = self.settings
        if not isinstance(request, dict):
            raise UserError("the question must be a JSON object")
        known = {"column", "question", "history", "image", "image_name", "toy_scene", *GENERATION}
        unknown = sorted(set(request) - known)
        if unknown:
            raise UserError(f"unknown fields {unknown} (known: {sorted(known)})")
        r = {"column": 0, "question": "", "history": [], "image": "", "image_name": "", "toy_scene": -1,
             **{k: s[k] for k in GENERATION}, **request}
        for key, kind in (("column", int), ("toy_scene", int), ("seed", int), ("question", str), ("image", str),
                          ("image_name", str), ("history", list)):
            if not isinstance(r[key], kind) or isinstance(r[key], bool):
                raise UserError(f"{key} must be {'a whole number' if kind is int else 'a ' + kind.__name__}, "
                                f"got {r[key]!r}")
        chat.check_sampling(r["max_new_tokens"], r["temperature"], r["top_k"])
        if not 0 <= r["seed"] < 2**63:
            raise UserError(f"seed must lie in 0..2**63-1, got {r['seed']}")
        if not 0 <= r["column"] < len(self.columns):
            raise UserError(f"column must lie in 0..{len(self.columns) - 1}, got {r['column']}")
        c = self.columns[r["column"]]
        model, tokenizer = c["model"], c["tokenizer"]

        if r["image"] or r["toy_scene"] >= 0:
            chat.check_can_see(c["path"], c["saw_images"])
        try:
            upload = base64.b64decode(r["image"], validate=True)
        except binascii.Error:
            raise UserError("image must be the picture file's bytes in base64") from None
        if len(upload) > s["max_upload_mb"] * 2**20:
            raise UserError(f"{r['image_name'] or 'the picture'} is larger than {s['max_upload_mb']:g} MB "
                            "(the server's max_upload_mb)")
        picture, _ = chat.load_picture(upload, r["toy_scene"], s["data_dir"], model.config.image_size,
                                       r["image_name"])
        image_ids = [] if picture is None else [tokenizer.image_id] * model.config.tokens_per_image
        if not r["question"] and (c["fine_tuned"] or picture is None):
            raise UserError("nothing to answer: ask a question (only a pretrained checkpoint continues an empty "
                            "prompt, and only after a picture)")
        turns = []  # a pretrained checkpoint has no conversation: each prompt stands alone
        for turn in r["history"] if c["fine_tuned"] else []:
            if not (isinstance(turn, list) and len(turn) == 2 and isinstance(turn[0], str) and isinstance(turn[1], list)
                    and all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in turn[1])):
                raise UserError("history must hold [question, answer token ids] pairs, as /ask's answers give them")
            turns.append(chat.encode_question(tokenizer, True, turn[0]) + turn[1] + [tokenizer.end_id])
        question_ids = chat.encode_question(tokenizer, c["fine_tuned"], r["question"])
        ids = chat.fit_context(image_ids, turns, question_ids, model.config.block_size, r["max_new_tokens"])
        stop_id = tokenizer.end_id if c["fine_tuned"] else tokenizer.eot_id
        return c, ids, picture, stop_id, {k: r[k] for k in GENERATION}

    def stream_answer(self, column, ids, picture, stop_id, generation):
        """The answer as server-sent events: "text" per token, then "done" with the answer's
        ids (the page sends them back as the conversation), or "error"."""
        g = generation
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        dev = self.settings["device"]
        generator = torch.Generator(dev).manual_seed(g["seed"])
        autocast = autocast_context(torch.device(dev).type, self.settings["dtype"])
        answer = []
        try:
            with column["lock"]:  # one request at a time per checkpoint; the others wait here
                pieces = chat.answer_pieces(column["model"], column["tokenizer"], ids, picture, stop_id,
                                            g["max_new_tokens"], g["temperature"], g["top_k"], generator, autocast)
                with contextlib.closing(pieces):  # ends its autocast in this thread when the page goes away
                    for token, text in pieces:
                        if token is not None:
                            answer.append(token)
                        self.send_event("text", {"text": text})
            self.send_event("done", {"answer_ids": answer})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away: stop generating and free the checkpoint for the next question
        except Exception:  # a bug: its traceback in the server's log, a message in the page, and carry on
            traceback.print_exc()
            with contextlib.suppress(OSError):
                self.send_event("error", {"message": "the server failed on this question (its log has why)"})

    def send_event(self, kind, data):
        self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def send_json(self, status, data):
        self.send_body(status, "application/json", json.dumps(data).encode())

    def send_body(self, status, content_type, body):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away before its answer


class Server(ThreadingHTTPServer):
    daemon_threads = True  # an answer still streaming does not hold up Ctrl-C
    request_queue_size = 64  # connections not yet accepted; with the default 5 a burst of questions gets resets


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Ask about a picture</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 0 auto; padding: 16px; color: #222; }
h1 { font-size: 20px; margin: 0 0 12px; }
#top { display: flex; gap: 16px; align-items: flex-start; }
#picture-box { width: 168px; flex: none; }
#picture { width: 160px; height: 160px; image-rendering: pixelated; object-fit: contain; border: 1px solid #ccc;
  background: #f3f3f3; display: block; }
#caption { font-size: 12px; color: #555; margin-top: 4px; }
fieldset { border: 1px solid #ddd; border-radius: 6px; margin: 0 0 8px; }
label { margin-right: 12px; white-space: nowrap; }
input[type=number] { width: 5em; }
#ask-row { display: flex; gap: 8px; margin: 4px 0 16px; }
#question { flex: 1; font-size: 16px; padding: 6px; }
#columns { display: grid; gap: 16px; }
.column { border: 1px solid #ddd; border-radius: 6px; padding: 10px; min-width: 0; }
.column h2 { font-size: 15px; margin: 0; word-break: break-all; }
.kind { font-size: 12px; color: #666; margin-bottom: 6px; }
.question { color: #555; margin-top: 10px; }
.question::before { content: "> "; }
.answer { white-space: pre-wrap; font-family: ui-monospace, monospace; min-height: 1.45em; }
.answer[data-state=streaming]::after { content: "\\2589"; color: #aaa; }
.error { color: #b00020; font-family: inherit; }
</style></head><body>
<h1>Ask about a picture</h1>
<div id="top">
  <div id="picture-box"><img id="picture" alt=""><div id="caption">no picture: text only</div></div>
  <div>
    <fieldset><legend>Picture</legend>
      <label>upload <input type="file" id="upload" accept="image/*"></label>
      <label id="scene-label">or toy scene <input type="number" id="scene" min="0"></label>
      <button id="no-picture">no picture</button>
    </fieldset>
    <fieldset><legend>Generation (temperature 0: greedy)</legend>
      <label>max new tokens <input type="number" id="max_new_tokens" min="1"></label>
      <label>temperature <input type="number" id="temperature" min="0" step="0.1"></label>
      <label>top k <input type="number" id="top_k" min="0"></label>
      <label>seed <input type="number" id="seed"></label>
    </fieldset>
  </div>
</div>
<form id="ask-row">
  <input id="question" placeholder="what color is the circle?" autocomplete="off">
  <button id="ask">ask</button> <button type="button" id="new">new conversation</button>
</form>
<div id="columns"></div>
<script>
const $ = id => document.getElementById(id);
let info, picture = {image: "", image_name: "", toy_scene: -1}, histories = [];

function newConversation() {
  histories = info.columns.map(() => []);
  document.querySelectorAll(".log").forEach(log => log.replaceChildren());
}

function showPicture(chosen, src, caption, isError) {
  picture = chosen;
  $("picture").src = src;
  $("caption").textContent = caption;
  $("caption").className = isError ? "error" : "";
  newConversation();
}

$("upload").onchange = () => {
  const file = $("upload").files[0];
  if (!file) return;
  $("scene").value = "";
  const none = {image: "", image_name: "", toy_scene: -1};
  if (file.size > info.max_upload_bytes)
    return showPicture(none, "", `${file.name} is larger than ${info.max_upload_bytes / 2 ** 20} MB: ` +
                       "choose a smaller picture", true);
  const reader = new FileReader();
  reader.onload = () => showPicture({image: reader.result.split(",")[1], image_name: file.name, toy_scene: -1},
                                    reader.result, file.name);
  reader.readAsDataURL(file);
};

$("scene").onchange = () => {
  const n = parseInt($("scene").value);
  $("upload").value = "";
  if (!(n >= 0 && n < info.toy_scenes.length))
    return showPicture({image: "", image_name: "", toy_scene: -1}, "",
                       `toy scenes are numbered 0 to ${info.toy_scenes.length - 1}`, true);
  showPicture({image: "", image_name: "", toy_scene: n}, `/scene/${n}.png`, `toy scene ${n}: ${info.toy_scenes[n]}`);
};

$("no-picture").onclick = () => {
  $("upload").value = ""; $("scene").value = "";
  showPicture({image: "", image_name: "", toy_scene: -1}, "", "no picture: text only");
};
$("new").onclick = newConversation;

function parseEvent(block) {
  let kind = "message", data = "";
  for (const line of block.split("\\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  return {kind, data: JSON.parse(data)};
}

function fail(answer, message) {
  answer.textContent = message;
  answer.classList.add("error");
  answer.dataset.state = "error";
}

async function ask(column, question, generation) {
  const log = document.querySelectorAll(".log")[column];
  const asked = document.createElement("div");
  asked.className = "question";
  asked.textContent = question || "(an empty prompt: the model continues from the picture)";
  const answer = document.createElement("div");
  answer.className = "answer";
  answer.dataset.state = "streaming";
  answer.dataset.tokens = 0;
  log.append(asked, answer);
  const history = histories[column];
  try {
    const response = await fetch("/ask", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({column, question, history, ...picture, ...generation})});
    if (!response.ok) return fail(answer, (await response.json()).error);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      for (let end; (end = buffer.indexOf("\\n\\n")) >= 0; buffer = buffer.slice(end + 2)) {
        const event = parseEvent(buffer.slice(0, end));
        if (event.kind === "text") {
          answer.textContent += event.data.text;
          answer.dataset.tokens++;
        } else if (event.kind === "done") {
          history.push([question, event.data.answer_ids]);
          answer.dataset.state = "done";
        } else if (event.kind === "error") fail(answer, event.data.message);
      }
    }
    if (answer.dataset.state === "streaming") fail(answer, "the server closed the answer before its end");
  } catch (error) {
    fail(answer, `no answer: ${error.message} (is the server running?)`);
  }
}

$("ask-row").onsubmit = async event => {
  event.preventDefault();
  const question = $("question").value.trim();
  const generation = {max_new_tokens: parseInt($("max_new_tokens").value),
                      temperature: parseFloat($("temperature").value),
                      top_k: parseInt($("top_k").value), seed: parseInt($("seed").value)};
  $("ask").disabled = true;
  await Promise.all(info.columns.map((_, column) => ask(column, question, generation)));
  $("ask").disabled = false;
  $("question").value = "";
  $("question").focus();
};

(async () => {
  info = await (await fetch("/info")).json();
  for (const key in info.defaults) $(key).value = info.defaults[key];
  $("scene").max = info.toy_scenes.length - 1;
  $("scene-label").hidden = info.toy_scenes.length === 0;
  $("columns").style.gridTemplateColumns = `repeat(${info.columns.length}, minmax(0, 1fr))`;
  for (const c of info.columns) {
    const column = document.createElement("div");
    column.className = "column";
    const name = document.createElement("h2");
    name.textContent = c.name;
    const kind = document.createElement("div");
    kind.className = "kind";
    kind.textContent = (c.fine_tuned ? "fine-tuned: answers questions, holds the conversation"
                                     : "pretrained: continues text; an empty prompt after a picture captions it") +
                       (c.saw_images ? "" : "; text only, its image encoder never trained");
    const log = document.createElement("div");
    log.className = "log";
    column.append(name, kind, log);
    $("columns").append(column);
  }
  newConversation();
  document.body.dataset.ready = "true";
})();
</script>
</body></html>
"""


def main(argv):
    settings = dict(ckpt=ckpt, ckpt_b=ckpt_b, data_dir=data_dir, host=host, port=port, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, seed=seed, max_upload_mb=max_upload_mb, device=device,
                    dtype=dtype)
    apply_overrides(settings, argv)
    s = settings
    chat.check_sampling(s["max_new_tokens"], s["temperature"], s["top_k"])
    if s["max_upload_mb"] <= 0:
        raise UserError(f"max_upload_mb must be positive, got {s['max_upload_mb']}")
    s["device"] = resolve_device(s["device"])
    autocast_context(torch.device(s["device"]).type, s["dtype"])  # a bad dtype stops here, not at the first question
    for path in [s["ckpt"]] + ([s["ckpt_b"]] if s["ckpt_b"] else []):
        model, tokenizer, fine_tuned, saw_images = load_model(path, s["device"])
        Handler.columns.append(dict(path=path, model=model, tokenizer=tokenizer, fine_tuned=fine_tuned,
                                    saw_images=saw_images, lock=threading.Lock()))
    Handler.settings = s
    Handler.toy_scene_captions = chat.toy_scene_captions(s["data_dir"])
    try:
        server = Server((s["host"], s["port"]), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {s['host']}:{s['port']} ({e.strerror}): choose another port") from None
    print(f"serving {len(Handler.columns)} checkpoint(s) at http://{s['host']}:{server.server_address[1]}/ "
          "(Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main(sys.argv[1:])
