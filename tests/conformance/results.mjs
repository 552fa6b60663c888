// Each test's result as the suite itself grades it (lib/display.mjs: dependencies, kinds).
// Prints one JSON line per test: {"suite", "id", "kind", "result"}.
// Usage: node results.mjs <http-cache-tests directory> <results.json from its cli.mjs>
import { readFileSync } from 'fs'
import { pathToFileURL } from 'url'

const [pkg, file] = process.argv.slice(2)
const load = async path => (await import(pathToFileURL(`${pkg}/${path}`))).default
// The command-line client runs the surrogate-control suite too (cli.mjs).
const suites = [...(await load('tests/index.mjs')), await load('tests/surrogate-control.mjs')]
const display = await import(pathToFileURL(`${pkg}/lib/display.mjs`))
const names = {
  '-': 'untested',
  '✅': 'pass',
  '⛔️': 'fail',
  '⚠️': 'optional_fail',
  Y: 'yes',
  N: 'no',
  '🔹': 'setup_fail',
  '⁉️': 'harness_fail',
  '⚪️': 'dependency_fail',
  '↻': 'retry'
}
const results = JSON.parse(readFileSync(file, 'utf8'))
for (const suite of suites) {
  for (const test of suite.tests) {
    if (test.browser_only) continue
    const symbol = display.determineTestResult(suites, test.id, results)[2]
    console.log(JSON.stringify({
      suite: suite.id,
      id: test.id,
      kind: test.kind ?? 'required',
      result: names[symbol] ?? symbol
    }))
  }
}
