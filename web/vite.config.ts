import { sveltekit } from '@sveltejs/kit/vite';
import { defineConfig } from 'vite';

const env = (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env ?? {};
const target = env.NESTBOX_URL ?? 'http://127.0.0.1:8080';

export default defineConfig({
  plugins: [sveltekit()],
  build: { sourcemap: false, chunkSizeWarningLimit: 2000 },
  server: {
    // `npm run dev` against a control plane on this machine (`make up`).
    proxy: {
      '/v1': { target, ws: true },
      '/openapi.json': target
    }
  }
});
