"""The game in a real browser: Debian's headless Chromium, driven by Playwright, against the served app.

Every response the server sends to the page goes through `Wire` first, so a test can say what the browser was
given before the verdict. Every screen is checked as a player on a desktop and on a phone meets it: an axe-core
audit with no serious or critical violation, nothing wider than the window, and a screenshot in
test-artifacts/browser/ (the README's pictures come from `test_readme_pictures_from_a_fine_tuned_suspect`).
"""

import html
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Error as PlaywrightError
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
DESKTOP = {"width": 1100, "height": 1000}
PHONE = {"width": 390, "height": 844}
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
        self.sent: list[tuple[str, str]] = []  # (url, request body): what the page told the server
        page.route("**/*", self._relay)

    def _relay(self, route):
        if "/heartbeat/" in route.request.url:
            route.continue_()
            return
        self.sent.append((route.request.url, route.request.post_data or ""))
        try:
            response = route.fetch(timeout=ANSWER_WAIT_MS)
        except PlaywrightError as exc:
            # The relay's client reuses keep-alive connections, and uvicorn closes one after 5 idle seconds: a
            # request sent as it closes is reset unread (the server closes only a connection with no request in
            # it), so asking again cannot run an event twice. Any other failure is the test's to report.
            if "ECONNRESET" not in str(exc):
                raise
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
    """The case's truth, each of its sentences, each run of six of its words that nothing public contains, and
    the text of each tell and quirk (the result screen's marks). Six, not five: a guilty suspect slipping its tell
    says five of the truth's words by chance ("on the lock landing, and": the swans of canal-top-lock's tell)."""
    truth = case["truth"]
    public = json.dumps({k: v for k, v in case.items() if k not in ("truth", "guilty")}).casefold()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", truth) if s.strip()]
    words = truth.split()
    runs = [" ".join(words[i:i + 6]) for i in range(len(words) - 5)]
    marks = [tell["text"] for tell in case.get("tells", [])] + case.get("quirks", [])
    return [truth, *sentences, *(r for r in runs if r.casefold() not in public), *marks]


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


def open_page(browser, url: str, viewport: dict, wire: bool = True, clock: bool = False):
    """A player's tab with the first briefing on screen; `wire`: every response recorded (then a streamed answer
    reaches the page whole, at its end: a test of what the page shows while answering goes without it); `clock`:
    the page's timers on Playwright's clock from the start, so that a test can pause and move them."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.wire = Wire(page) if wire else None
    if clock:
        page.clock.install()  # time flows as usual until a test pauses it
    page.goto(url)
    # The random case of the page's first load is on screen (a busy server may take a while).
    expect(page.locator("#begin")).to_be_enabled(timeout=ANSWER_WAIT_MS)
    if wire:
        page.wire.settle()
    return page


def close_page(page) -> None:
    page.unroute_all(behavior="ignoreErrors")  # an answer may still be on its way
    page.context.close()


@contextmanager
def opened(browser, url: str, viewport: dict = DESKTOP):
    """A player's tab as a context, closed whatever the test does (a game played on another room's server)."""
    page = open_page(browser, url, viewport)
    try:
        yield page
    finally:
        close_page(page)


@pytest.fixture(params=["desktop"])
def page(browser, served, request):
    """A desktop player's tab; `@pytest.mark.parametrize("page", ["phone"], indirect=True)` for a phone's."""
    page = open_page(browser, served[1], PHONE if request.param == "phone" else DESKTOP)
    yield page
    close_page(page)


def shoot(page, name: str, path: Path | None = None) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    width = page.viewport_size["width"]
    page.screenshot(path=path or ARTIFACTS / f"{name}{'-phone' if width < 600 else ''}.png", full_page=True)


SERIOUS = {"serious", "critical"}


def check_screen(page, name: str) -> None:
    """A screen as every player meets it: an axe-core audit finds no serious or critical violation, the page is
    no wider than the window (no horizontal scrolling on a phone), and a screenshot of it is kept."""
    shoot(page, name)
    results = Axe().run(page)
    found = [v for v in results.response["violations"] if v["impact"] in SERIOUS]
    report = ARTIFACTS / f"{name}-axe.json"
    report.unlink(missing_ok=True)
    if found:
        report.write_text(json.dumps(found, indent=1))
    assert not found, f"{name}: " + results.generate_report()
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{name}: the page is {overflow}px wider than the window"


def choose_case(page, title: str) -> None:
    """Pick a case by its title in the Case list: its briefing is on screen at once."""
    page.locator("#case-choice input").click()
    page.get_by_role("option", name=title, exact=True).click()
    page.wire.settle()
    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()
    expect(page.locator("#begin")).to_be_enabled()


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
    check_screen(page, f"{shots}-1-briefing")

    page.locator("#begin").click()
    expect(page.locator("#progress")).to_have_text("Question 1 of 5")
    expect(page.locator("#guilty")).to_be_disabled()
    expect(page.locator("#case-file")).to_contain_text(case["briefing"])  # the case file stays at hand
    expect(page.locator("#case-file")).to_contain_text(f"{suspect['name']}, {suspect['age']}, {suspect['role']}")
    check_screen(page, f"{shots}-2-first-question")
    for n, question in enumerate(QUESTIONS, start=1):
        ask(page, question, f"Question {n + 1} of 5" if n < 5 else "All 5 questions asked: give your verdict.")
        expect(page.locator("#guilty")).to_be_enabled()
        if n == 2:
            check_screen(page, f"{shots}-3-questioning")
    assert bubbles(page, "chat", "user") == QUESTIONS
    answers = bubbles(page, "chat", "bot")
    assert len(answers) == 5 and all(answers)

    expect(page.locator("#ask")).to_be_disabled()
    page.locator("#question textarea").fill("Just one more thing?")
    page.locator("#question textarea").press("Enter")  # the Ask button is off; the text box still submits
    expect(toast(page, SIXTH_REFUSED)).to_be_visible()
    page.wire.settle()
    assert bubbles(page, "chat", "user") == QUESTIONS
    check_screen(page, f"{shots}-4-sixth-refused")
    toast(page, SIXTH_REFUSED).locator(".toast-close").click()
    expect(toast(page, SIXTH_REFUSED)).to_be_hidden()

    sent_before_verdict = page.wire.text() + page.content()
    assert not leaks(sent_before_verdict, case)
    since = len(page.wire.received)
    page.locator("#guilty" if verdict == "guilty" else "#innocent").click()
    expect(page.locator("#result")).to_contain_text(case["truth"])
    assert case["truth"] in page.wire.text(since), "the wire recorder must see what the verdict sends"
    check_screen(page, f"{shots}-5-result")


def test_a_guilty_game_through_the_page_hides_the_truth_until_the_verdict(page):
    play_whole_game(page, MINIMAL_CASE, "guilty", "guilty-game")
    result = page.locator("#result")
    expect(result).to_contain_text("You were right")
    expect(result).to_contain_text("You said guilty; the suspect was guilty")
    expect(result).to_contain_text("1 of 1 players got this case right")
    assert bubbles(page, "transcript", "user") == QUESTIONS
    expect(page.locator("#chat")).to_be_hidden()

    page.locator("#new-case").click()
    page.wire.settle()
    expect(page.locator("#begin")).to_be_visible()
    expect(page.locator("#result")).to_be_hidden()
    expect(page.get_by_role("heading", name=MINIMAL_CASE["title"], exact=True)).to_be_visible()
    page.locator("#begin").click()
    expect(page.locator("#progress")).to_have_text("Question 1 of 5")
    assert bubbles(page, "chat", "user") == []
    check_screen(page, "guilty-game-6-new-case")


def test_an_innocent_game_through_the_page_hides_the_truth_until_the_verdict(page):
    play_whole_game(page, INNOCENT_CASE, "innocent", "innocent-game")
    result = page.locator("#result")
    expect(result).to_contain_text("You were right")
    expect(result).to_contain_text("You said not guilty; the suspect was innocent")
    expect(result).to_contain_text("1 of 1 players got this case right")
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


def quick_game(page, case: dict, verdict: str, question: str = "Where were you when it happened?") -> None:
    """A game of one question, from the Case list to the result screen."""
    choose_case(page, case["title"])
    page.locator("#begin").click()
    ask(page, question, "Question 2 of 5")
    page.locator("#guilty" if verdict == "guilty" else "#innocent").click()
    expect(page.locator("#result")).to_contain_text(case["truth"])


def test_each_case_chosen_by_title_is_the_case_questioned(page, bundled):
    for case in bundled:
        choose_case(page, case["title"])
        page.locator("#begin").click()
        file = page.locator("#case-file")
        expect(file).to_contain_text(f"Case file: {case['title']}")
        expect(file).to_contain_text(case["briefing"])
        ask(page, "What happened?", "Question 2 of 5")
        assert not leaks(page.wire.text() + page.content(), case)
        page.locator("#innocent").click()
        expect(page.locator("#result")).to_contain_text(case["truth"])  # the server played this very case
        page.locator("#new-case").click()
        page.wire.settle()


def test_another_case_deals_a_random_case_and_resets_the_choice(page):
    choose_case(page, MINIMAL_CASE["title"])
    page.locator("#another-case").click()
    page.wire.settle()
    expect(page.locator("#case-choice input")).to_have_value("A random case")
    expect(page.locator("#begin")).to_be_enabled()
    expect(page.locator("#briefing h2")).to_have_count(1)


def test_notes_stay_in_the_browser(page):
    choose_case(page, MINIMAL_CASE["title"])
    page.locator("#begin").click()
    note = "east pane broken from inside? check the six o'clock lock"
    page.locator("#notes textarea").fill(note)
    ask(page, "Where were you last night?", "Question 2 of 5")
    expect(page.locator("#notes textarea")).to_have_value(note)
    assert page.wire.sent, "the wire recorder must see what the page sends"
    assert [url for url, body in page.wire.sent if "east pane broken" in body] == []


def test_the_score_counts_games_right_verdicts_and_the_streak(page, bundled):
    guilty = next(c for c in bundled if c["guilty"])
    innocent = next(c for c in bundled if not c["guilty"])
    score = page.locator("#score")
    expect(score).to_have_text("Your score: no verdicts yet.")
    quick_game(page, guilty, "guilty")
    expect(score).to_have_text("Your score: 1 of 1 verdicts right · current streak 1")
    page.locator("#new-case").click()
    quick_game(page, innocent, "innocent")
    expect(score).to_have_text("Your score: 2 of 2 verdicts right · current streak 2")
    page.locator("#new-case").click()
    quick_game(page, innocent, "guilty")
    expect(score).to_have_text("Your score: 2 of 3 verdicts right · current streak 0")


def test_the_result_marks_each_answer_that_slipped_a_tell(page):
    from game.review import slips
    from game.scenario import Case
    from game.session import Exchange

    choose_case(page, MINIMAL_CASE["title"])
    page.locator("#begin").click()
    for n, question in enumerate(["Was the orchid wrapped in newspaper?", "Where were you last night?"], start=2):
        ask(page, question, f"Question {n} of 5")
    answers = bubbles(page, "chat", "bot")
    page.locator("#guilty").click()
    expect(page.locator("#result")).to_contain_text(MINIMAL_CASE["truth"])
    expected = slips(Case.model_validate(MINIMAL_CASE), [Exchange(q, a) for q, a in zip("ab", answers)])
    shown = bubbles(page, "transcript", "bot")
    assert [a.count("🔎 A slip: ") for a in shown] == [len(marks) for marks in expected]
    for answer, marks in zip(shown, expected):
        assert all(f"🔎 A slip: {mark}" in answer for mark in marks)
    check_screen(page, "result-marks")


RECORD_PROGRESS = """() => {
  window.seen = [];
  const note = () => window.seen.push({
    text: document.querySelector('#progress')?.innerText ?? '',
    locked: document.querySelector('#question textarea')?.disabled ?? null});
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                    attributes: true});
}"""


def test_while_answering_the_page_says_so_and_locks_the_question_box(browser, served):
    page = open_page(browser, served[1], DESKTOP, wire=False, clock=True)  # answers reach the page as they grow
    try:
        page.locator("#begin").click()
        page.evaluate(RECORD_PROGRESS)
        page.locator("#question textarea").fill("Tell me everything you did last night, hour by hour.")
        page.locator("#ask").click()
        expect(page.locator("#progress")).to_have_text("Question 2 of 5", timeout=ANSWER_WAIT_MS)
        expect(page.locator("#question textarea")).to_be_enabled()
        expect(page.locator("#question textarea")).to_be_focused()  # a keyboard player types on at once
        seen = page.evaluate("window.seen")
        name = page.locator("#case-file strong").first.inner_text()
        thinking = [s for s in seen if f"{name} is thinking…" in s["text"]]
        # Gradio's own timer may sit above the line as the answer ends: while only the line shows, the box is locked.
        assert thinking and all(s["locked"] for s in thinking if "\n" not in s["text"]), seen
        # The seconds are the page's own count: a thinking line put back (a fast engine may answer before the page's
        # clock could be moved on) counts on as the clock moves, whatever the server does meanwhile.
        # The clock is paused first: on a loaded machine time flowing on would add its seconds to the count.
        page.clock.pause_at(page.evaluate("Date.now()") + 1_000)
        page.evaluate("""name => document.querySelector("#progress").insertAdjacentHTML("beforeend",
            `<p>${name} is thinking… <span class="elapsed">0 s</span></p>`)""", name)
        page.clock.run_for(500)  # the page's timer sees the line appear and starts counting
        page.clock.run_for(3_000)
        expect(page.locator("#progress .elapsed")).to_have_text("3 s")
    finally:
        close_page(page)


def test_a_queued_player_sees_their_place_in_the_queue(browser, served, serve):
    room, _ = served
    url = serve(room, answers_at_once=1)  # a busy server: one answer at a time
    pages = [open_page(browser, url, DESKTOP, wire=False) for _ in range(3)]
    try:
        for page in pages:
            page.locator("#begin").click()
            page.evaluate(RECORD_PROGRESS)
            page.locator("#question textarea").fill("Tell me everything you did last night, hour by hour.")
        # All three ask at the same instant, each page's own timer firing its click: asked one after another, the
        # first answer could end before the third question arrived and no one would have waited.
        at = pages[0].evaluate("Date.now()") + 1_000
        for page in pages:
            page.evaluate("at => setTimeout(() => document.querySelector('#ask').click(), at - Date.now())", at)
        for page in pages:
            expect(page.locator("#progress")).to_have_text("Question 2 of 5", timeout=ANSWER_WAIT_MS)
        seen = [s["text"] for page in pages for s in page.evaluate("window.seen")]
        # Place 1 is shown for a moment to anyone about to be served; place 2 is a player waiting behind another.
        assert any(re.search(r"queue: [2-9]/[2-9]", text) for text in seen), seen
    finally:
        for page in pages:
            close_page(page)


def tab_to(page, selector: str, limit: int = 80) -> None:
    """Press Tab until the focus is in `selector`, as a keyboard player would."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => !!document.activeElement?.closest(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


def test_a_whole_game_by_keyboard_alone(page, bundled):
    case = next(c for c in bundled if c["guilty"])
    tab_to(page, "#case-choice")
    page.keyboard.type(case["title"])
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    page.wire.settle()
    expect(page.get_by_role("heading", name=case["title"], exact=True)).to_be_visible()
    tab_to(page, "#begin")
    page.keyboard.press("Enter")
    expect(page.locator("#question textarea")).to_be_focused()
    for n, question in enumerate(["Where were you when it happened?", "Can anyone confirm that?"], start=2):
        page.keyboard.type(question)
        page.keyboard.press("Enter")
        expect(page.locator("#progress")).to_have_text(f"Question {n} of 5", timeout=ANSWER_WAIT_MS)
        expect(page.locator("#question textarea")).to_be_focused()
    tab_to(page, "#guilty")
    page.keyboard.press("Enter")
    expect(page.locator("#result")).to_contain_text(case["truth"])
    check_screen(page, "keyboard-result")
    tab_to(page, "#new-case")
    page.keyboard.press("Enter")
    expect(page.locator("#begin")).to_be_visible()


@pytest.mark.parametrize("page", ["phone"], indirect=True)
def test_a_whole_game_on_a_phone(page, bundled):
    case = next(c for c in bundled if not c["guilty"])
    play_whole_game(page, case, "innocent", "phone-game")
    expect(page.locator("#result")).to_contain_text("You were right")


README_CASE = "theatre-understudy"  # a bundled case whose fine-tuned suspect slips two tells in three answers
README_QUESTIONS = ["Where were you during the interval?", "What was in the flask?",
                    "When did you reach the wardrobe room?"]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, serve):
    """A room of one bundled case and its bundled adapter, the game's own settings: what a player gets."""
    folder = tmp_path_factory.mktemp("readme")
    scenarios = folder / "scenarios"
    scenarios.mkdir()
    case_file = ROOT / "scenarios" / f"{README_CASE}.json"
    (scenarios / case_file.name).write_bytes(case_file.read_bytes())  # the same bytes: the adapter is not stale
    room = open_room(GameConfig(scenarios=scenarios, adapters=ROOT / "adapters", results=folder / "results.db"))
    return json.loads(case_file.read_text()), serve(room)


def test_readme_pictures_from_a_fine_tuned_suspect(browser, fine_tuned):
    """docs/screenshot.png (questioning, the case file at hand) and docs/result.png (the slips marked)."""
    case, url = fine_tuned
    page = open_page(browser, url, {"width": 1280, "height": 900})
    try:
        expect(page.locator("#briefing")).to_contain_text("Fine-tuned suspect")
        page.locator("#begin").click()
        for n, question in enumerate(README_QUESTIONS, start=2):
            ask(page, question, f"Question {n} of 5")
        assert all(bubbles(page, "chat", "bot"))
        page.locator("#notes textarea").fill("Late to wardrobe: where was she from 8:40?\nWho said chilli?")
        assert not leaks(page.wire.text() + page.content(), case)
        check_screen(page, "readme-questioning")
        shoot(page, "", ROOT / "docs" / "screenshot.png")
        page.locator("#guilty").click()
        expect(page.locator("#result")).to_contain_text(case["truth"])
        shown = "\n".join(bubbles(page, "transcript", "bot"))
        assert any(f"🔎 A slip: {tell['text']}" in shown for tell in case["tells"]), shown
        check_screen(page, "readme-result")
        shoot(page, "", ROOT / "docs" / "result.png")
    finally:
        close_page(page)
