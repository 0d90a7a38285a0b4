// Every page renders in the browser (the control plane serves the same index.html for all
// of them); nothing is prerendered.
export const ssr = false;
export const prerender = false;
export const trailingSlash = 'never';
