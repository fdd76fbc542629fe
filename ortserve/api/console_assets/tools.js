// The chat's tool demo: a weather tool the page itself answers (no outside service), so a
// tool call's round trip can be seen end to end. Its shape is what demo-chat was trained on.

export const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Get the current weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", description: "The city, e.g. Paris" } },
      required: ["city"],
    },
  },
};

const CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy"];

// Made-up but stable weather: the same city always gets the same answer.
export function getWeather({ city = "" } = {}) {
  let hash = 0;
  for (const c of String(city)) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return {
    city: String(city),
    temperature: (hash % 30) - 2,
    unit: "celsius",
    condition: CONDITIONS[hash % CONDITIONS.length],
  };
}

// Runs one call of the model's; unknown tools answer with an error the model can read.
export function runTool(call) {
  const fn = call.function || {};
  let args = fn.arguments || {};
  if (typeof args === "string") {
    try {
      args = JSON.parse(args);
    } catch {
      args = {};
    }
  }
  if (fn.name === WEATHER_TOOL.function.name) return JSON.stringify(getWeather(args));
  return JSON.stringify({ error: `no tool named ${fn.name}` });
}
