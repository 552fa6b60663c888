// The suite's own origin server (node_modules/http-cache-tests/server), listening on an
// ephemeral loopback port instead of the package's fixed one. Prints the port, then serves.
// Usage: node origin.mjs <http-cache-tests directory>
import http from 'http'
import { pathToFileURL } from 'url'

const pkg = process.argv[2]
const load = async name => (await import(pathToFileURL(`${pkg}/server/${name}.mjs`))).default
const handlers = {
  config: await load('handle-config'),
  test: await load('handle-test'),
  state: await load('handle-state')
}
const handleFile = await load('handle-file')

// The same dispatch as the package's server/server.mjs.
const server = http.createServer((request, response) => {
  const url = new URL(request.url, 'http://localhost/')
  const segments = url.pathname.split('/')
  segments.shift()
  const handler = handlers[segments.shift()]
  if (handler) handler(segments, request, response)
  else handleFile(url, request, response)
})
server.listen(0, '127.0.0.1', () => console.log(server.address().port))
