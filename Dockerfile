# The controller on the official Node 24 image: docker build -t book-controller:0.1.0 .
# Node 24 strips the types of controller.ts itself, so no tsx: it starts faster, needs less
# memory, and the kubelet's SIGTERM reaches the controller directly.
FROM node:24-slim
WORKDIR /app
COPY package.json package-lock.json .npmrc ./
RUN npm ci --omit=dev && npm cache clean --force
COPY controller.ts ./
USER node
CMD ["node", "controller.ts"]
