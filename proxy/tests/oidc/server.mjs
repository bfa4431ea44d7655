// An independent OAuth2/OIDC server (oauth2-mock-server) for the gateway's tests.
// Usage: node server.mjs [port]; prints {"issuer": "..."} once listening.
import { OAuth2Server } from 'oauth2-mock-server';

const port = Number(process.argv[2] ?? 0);
const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

// Like a client-id mapper in a real identity provider: client-credentials tokens name
// the client that authenticated (RFC 9068 `client_id`).
server.service.on('beforeTokenSigning', (token, req) => {
  let client = req.body?.client_id;
  const auth = req.headers.authorization;
  if (auth?.startsWith('Basic ')) {
    client = Buffer.from(auth.slice(6), 'base64').toString().split(':')[0];
  }
  if (client) token.payload.client_id = client;
});

await server.start(port, '127.0.0.1');
console.log(JSON.stringify({ issuer: server.issuer.url }));
process.on('SIGTERM', async () => { await server.stop(); process.exit(0); });
