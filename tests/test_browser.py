"""The game in a real browser: Debian's headless Chromium, driven by Playwright, against the served app.

Every response the server sends to the page goes through `Wire` first, so a test can say what the browser was
given before the verdict. Screenshots of each step land in test-artifacts/browser/.
"""

import html
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import INNOCENT_CASE, MINIMAL_CASE, ROOT, write_scenarios
from game.config import GameConfig
from game.room import open_room
from game.scenario import load_cases

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (make chromium); Playwright's own download cannot reach its host
# Without the background-networking flags Chromium's own connections are refused by the closed network and stall it.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
ANSWER_WAIT_MS = 240_000  # one answer on a busy 2-core CPU
PAGE_WAIT_MS = 60_000  # the page's scripts, on the same busy CPU (Playwright's 5 s default is short for it)
QUESTIONS = ["Where were you last night?", "Who else has a key to the greenhouse?", "What did you find this morning?",
             "Why is the east pane broken?", "Did you take the orchid?"]
SIXTH_REFUSED = "you have asked all 5 questions; give your verdict"


class Wire:
    """Every response the server sends the page, recorded before the page gets it.

    A route fetches each response from the server and hands it on unchanged, so nothing reaches the page unseen
    (listening to responses instead misses SSE streams the page aborts). An SSE stream (answers, verdicts) reaches
    the page whole once its events are done. The heartbeat stream is let through: it never ends, and it carries
    only `data: ALIVE` (gradio/routes.py).
    """

    def __init__(self, page):
        self.page = page
        self.received: list[tuple[str, str]] = []  # (url, body)
        page.route("**/*", self._relay)

    def _relay(self, route):
        if "/heartbeat/" in route.request.url:
            route.continue_()
            return
        response = route.fetch(timeout=ANSWER_WAIT_MS)
        body = response.body()
        self.received.append((route.request.url, body.decode("utf-8", "replace")))
        route.fulfill(response=response, body=body)

    def text(self, since: int = 0) -> str:
        return "\n".join(body for _, body in self.received[since:])

    def settle(self, timeout_s: float = ANSWER_WAIT_MS / 1000) -> None:
        """Wait until every event the page sent has completed (and the page has had a moment to draw it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.text()
            joined = set(re.findall(r'^\{"event_id":\s*"(\w+)"\}$', text, re.MULTILINE))
            done = set(re.findall(r'"msg":\s*"process_completed",\s*"event_id":\s*"(\w+)"', text))
            if joined <= done:
                self.page.wait_for_timeout(300)
                return
            self.page.wait_for_timeout(100)  # not time.sleep: the route handlers run while Playwright waits
        raise TimeoutError("the page's events did not complete")


def hidden_parts(case: dict) -> list[str]:
    """The case's truth, each of its sentences, and each run of five of its words that nothing public contains."""
    truth = case["truth"]
    public = json.dumps({k: v for k, v in case.items() if k not in ("truth", "guilty")}).casefold()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", truth) if s.strip()]
    words = truth.split()
    runs = [" ".join(words[i:i + 5]) for i in range(len(words) - 4)]
    return [truth, *sentences, *(r for r in runs if r.casefold() not in public)]


GUILTY_KEY = re.compile(r"""["']guilty["']\s*:\s*(true|false)""", re.IGNORECASE)
TRUTH_KEY = re.compile(r"""["']truth["']\s*:""", re.IGNORECASE)


def leaks(sent: str, case: dict) -> list[str]:
    """What of the case's secrets appears in `sent`, in any of the encodings a page receives text in."""
    sent = sent.casefold()
    found = [part for part in hidden_parts(case)
             if any(form.casefold() in sent for form in
                    {part, html.escape(part), json.dumps(part)[1:-1], json.dumps(part, ensure_ascii=False)[1:-1]})]
    found += [m.group() for m in GUILTY_KEY.finditer(sent)] + [m.group() for m in TRUTH_KEY.finditer(sent)]
    return found


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed: run `make chromium` (as root)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def bundled():
    return [json.loads(loaded.path.read_text()) for _, loaded in sorted(load_cases(ROOT / "scenarios").items())]


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve, bundled):
    folder = tmp_path_factory.mktemp("browser")
    scenarios = write_scenarios(folder / "scenarios", [MINIMAL_CASE, INNOCENT_CASE, *bundled])
    # 32 tokens: answers of a sentence or two, enough for a screenshot, and ten of them fit the suite's time.
    room = open_room(GameConfig(scenarios=scenarios, adapters=folder / "adapters", results=folder / "results.db",
                                max_new_tokens=32))
    return room, serve(room)


@contextmanager
def opened(browser, url: str):
    """A fresh browser session on the game's page, every response recorded (page.wire)."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    page.wire = Wire(page)
    page.goto(url)
    expect(page.locator("#begin")).to_be_visible(timeout=PAGE_WAIT_MS)
    page.wire.settle()  # the random case of the page's first load is on screen
    try:
        yield page
    finally:
        page.unroute_all(behavior="ignoreErrors")  # an answer may still be on its way
        context.close()


@pytest.fixture
def page(browser, served):
    with opened(browser, served[1]) as page:
        yield page


def shoot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def choose_case(page, title: str) -> None:
    page.locator("#case-choice input").click()
    page.get_by_role("option", name=title, exact=True).click()
    page.locator("#another-case").click()
    page.wire.settle()
    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()


def ask(page, question: str, expect_progress: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    expect(page.locator("#progress")).to_have_text(expect_progress, timeout=ANSWER_WAIT_MS)


def toast(page, message: str):
    return page.locator(".toast-body").filter(has_text=message)


def bubbles(page, chat: str, role: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#{chat} [data-testid={role}]").all_inner_texts()]


def play_whole_game(page, case: dict, verdict: str, shots: str, note: str = "Prompt-only suspect") -> None:
    """Briefing, five questions, a refused sixth, the verdict: checking what the page shows at each step.
    note: which suspect the briefing says plays (prompt-only: no adapter in this file's room)."""
    choose_case(page, case["title"])
    suspect = case["suspect"]
    expect(page.get_by_text(f"{suspect['name']}, {suspect['age']}, {suspect['role']}")).to_be_visible()
    expect(page.get_by_text(note)).to_be_visible()
    shoot(page, f"{shots}-1-briefing")

    page.locator("#begin").click()
    expect(page.locator("#progress")).to_have_text("Question 1 of 5")
    expect(page.locator("#guilty")).to_be_disabled()
    for n, question in enumerate(QUESTIONS, start=1):
        ask(page, question, f"Question {n + 1} of 5" if n < 5 else "All 5 questions asked: give your verdict.")
        expect(page.locator("#guilty")).to_be_enabled()
        if n == 2:
            shoot(page, f"{shots}-2-questioning")
    assert bubbles(page, "chat", "user") == QUESTIONS
    answers = bubbles(page, "chat", "bot")
    assert len(answers) == 5 and all(answers)

    expect(page.locator("#ask")).to_be_disabled()
    page.locator("#question textarea").fill("Just one more thing?")
    page.locator("#question textarea").press("Enter")  # the Ask button is off; the text box still submits
    expect(toast(page, SIXTH_REFUSED)).to_be_visible()
    page.wire.settle()
    assert bubbles(page, "chat", "user") == QUESTIONS
    shoot(page, f"{shots}-3-sixth-refused")
    toast(page, SIXTH_REFUSED).locator(".toast-close").click()
    expect(toast(page, SIXTH_REFUSED)).to_be_hidden()

    sent_before_verdict = page.wire.text() + page.content()
    assert not leaks(sent_before_verdict, case)
    since = len(page.wire.received)
    page.locator("#guilty" if verdict == "guilty" else "#innocent").click()
    expect(page.locator("#result")).to_contain_text(case["truth"])
    assert case["truth"] in page.wire.text(since), "the wire recorder must see what the verdict sends"


def test_a_guilty_game_through_the_page_hides_the_truth_until_the_verdict(page):
    play_whole_game(page, MINIMAL_CASE, "guilty", "guilty-game")
    result = page.locator("#result")
    expect(result).to_contain_text("You were right")
    expect(result).to_contain_text("You said guilty; the suspect was guilty")
    expect(result).to_contain_text("1 of 1 players got this case right")
    assert bubbles(page, "transcript", "user") == QUESTIONS
    expect(page.locator("#chat")).to_be_hidden()
    shoot(page, "guilty-game-4-result")

    page.locator("#new-case").click()
    page.wire.settle()
    expect(page.locator("#begin")).to_be_visible()
    expect(page.locator("#result")).to_be_hidden()
    expect(page.get_by_role("heading", name=MINIMAL_CASE["title"], exact=True)).to_be_visible()
    page.locator("#begin").click()
    expect(page.locator("#progress")).to_have_text("Question 1 of 5")
    assert bubbles(page, "chat", "user") == []
    shoot(page, "guilty-game-5-new-case")


def test_an_innocent_game_through_the_page_hides_the_truth_until_the_verdict(page):
    play_whole_game(page, INNOCENT_CASE, "innocent", "innocent-game")
    result = page.locator("#result")
    expect(result).to_contain_text("You were right")
    expect(result).to_contain_text("You said not guilty; the suspect was innocent")
    expect(result).to_contain_text("1 of 1 players got this case right")
    shoot(page, "innocent-game-4-result")
    page.locator("#new-case").click()
    expect(page.locator("#begin")).to_be_visible()


def test_no_bundled_case_sends_its_truth_with_the_briefing(page, bundled):
    assert bundled, "no bundled case under scenarios/"
    for case in bundled:
        choose_case(page, case["title"])
        expect(page.get_by_text(case["suspect"]["name"]).first).to_be_visible()
    sent = page.wire.text() + page.content()
    assert {case["id"]: leaks(sent, case) for case in bundled} == {case["id"]: [] for case in bundled}


def test_markup_in_a_question_is_shown_as_inert_text(page):
    choose_case(page, MINIMAL_CASE["title"])
    page.locator("#begin").click()
    question = ('<img src=x onerror="window.pwned=1"><script>window.pwned=1</script><b>bold</b> '
                '[link](javascript:window.pwned=1) Where were you?')
    ask(page, question, "Question 2 of 5")
    assert bubbles(page, "chat", "user") == [question]
    chat = page.locator("#chat")
    assert chat.locator("[data-testid=user] img, [data-testid=user] script, [data-testid=user] b").count() == 0
    assert chat.locator("a[href^='javascript']").count() == 0
    assert page.evaluate("window.pwned") is None
    shoot(page, "markup-question")


def test_an_empty_question_gets_a_clear_message_and_costs_nothing(page):
    choose_case(page, MINIMAL_CASE["title"])
    page.locator("#begin").click()
    page.locator("#ask").click()
    expect(toast(page, "the question is empty")).to_be_visible()
    page.wire.settle()
    expect(page.locator("#progress")).to_have_text("Question 1 of 5")
    assert bubbles(page, "chat", "user") == []
    expect(page.locator("#chat")).not_to_contain_text("Error")  # the refusal does not cover the chat
    shoot(page, "empty-question")


def test_an_over_long_question_gets_a_clear_message(page):
    choose_case(page, MINIMAL_CASE["title"])
    page.locator("#begin").click()
    box = page.locator("#question textarea")
    assert box.get_attribute("maxlength") == "500"  # typing stops there; a script can still send more:
    box.evaluate("element => element.removeAttribute('maxlength')")
    box.fill("Why? " * 120)
    page.locator("#ask").click()
    expect(toast(page, "the question is 599 characters long; the limit is 500")).to_be_visible()
    page.wire.settle()
    expect(page.locator("#progress")).to_have_text("Question 1 of 5")
    shoot(page, "over-long-question")
